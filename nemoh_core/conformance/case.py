"""The conformance harness's data model: cases, metrics, results, suites.

A case is data (ggml's test-backend-ops style): a suite name, parameters, a seed, and an id that
names it (`prefill-chunks(split=[1,259],T=260,B=2)`). Running it yields a `Result`: OK, FAIL,
NOT_SUPPORTED or SKIPPED, every measured metric next to its tolerance, and for a FAIL the
localisation (first layer and op that leave tolerance). Suites only produce results; the report
only renders them.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nemoh.conformance.tolerances import tol


class Status(enum.StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    NOT_SUPPORTED = "NOT_SUPPORTED"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True)
class Case:
    suite: str
    name: str  # short label inside the suite, e.g. "split=[1,259]"
    params: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def id(self) -> str:
        return f"{self.suite}({self.name})"


@dataclass
class Metric:
    name: str  # tolerance-table metric, e.g. "logits_rel_max_abs"
    value: float
    tolerance: float | None  # None: measured and reported, not judged
    higher_is_better: bool = False
    label: str = ""  # what was compared, e.g. "vs oracle fp64"
    # dtype-relative verdicts: the same metric for the reference implementation at this dtype against
    # the same fp64 reference (the tolerance was derived from it), and what that reference was
    baseline: float | None = None
    baseline_label: str = ""

    @property
    def ok(self) -> bool:
        if self.tolerance is None:
            return True
        if isinstance(self.value, float) and math.isnan(self.value):
            return False
        return self.value >= self.tolerance if self.higher_is_better else self.value <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        v = self.value
        return {"name": self.name, "label": self.label, "value": None if (isinstance(v, float) and not math.isfinite(v))
                else v, "value_repr": f"{v:.3g}" if isinstance(v, float) else str(v), "tolerance": self.tolerance,
                "higher_is_better": self.higher_is_better, "ok": self.ok,
                "badness": _finite_or_none(badness(self)), **self._baseline_json()}

    def _baseline_json(self) -> dict[str, Any]:
        if self.baseline is None:
            return {}
        from nemoh.conformance.tolerances import ratio

        return {"baseline": _finite_or_none(self.baseline), "baseline_label": self.baseline_label,
                "ratio": _finite_or_none(ratio(self.name, self.value, self.baseline))}


@dataclass
class Result:
    case: Case
    status: Status
    metrics: list[Metric] = field(default_factory=list)
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # worst position, first divergence, ...
    localisation: dict[str, Any] | None = None
    duration_s: float = 0.0

    def worst(self) -> Metric | None:
        """The judged metric closest to (or furthest past) its tolerance."""
        judged = [m for m in self.metrics if m.tolerance is not None]
        return max(judged, key=badness) if judged else None

    def to_json(self) -> dict[str, Any]:
        w = self.worst()
        return {"id": self.case.id, "suite": self.case.suite, "name": self.case.name,
                "params": {k: jsonable(v) for k, v in self.case.params}, "seed": self.case.seed,
                "status": self.status.value, "metrics": [m.to_json() for m in self.metrics],
                "worst_metric": w.to_json() if w else None, "message": self.message,
                "details": jsonable(self.details), "localisation": jsonable(self.localisation),
                "duration_s": round(self.duration_s, 4)}


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    return x


def judge(case: Case, metrics: Sequence[Metric], **kw: Any) -> Result:
    """OK when every judged metric is within tolerance, else FAIL naming the ones that are not."""
    bad = sorted((m for m in metrics if not m.ok), key=badness, reverse=True)
    msg = "; ".join(f"{m.label + ' ' if m.label else ''}{m.name}={m.to_json()['value_repr']} "
                    f"{'<' if m.higher_is_better else '>'} {m.tolerance:.3g}" for m in bad[:3])
    if len(bad) > 3:
        msg += f"; and {len(bad) - 3} more metrics out of tolerance"
    return Result(case, Status.FAIL if bad else Status.OK, list(metrics), msg, **kw)


def badness(m: Metric) -> float:
    """How far past (or short of) its tolerance a metric is, as a ratio; NaN is worst."""
    if isinstance(m.value, float) and math.isnan(m.value):
        return math.inf
    if m.tolerance is None:
        return 0.0
    if m.higher_is_better:
        return (1 - m.value) / max(1 - m.tolerance, 1e-300)
    return m.value / m.tolerance if m.tolerance else (math.inf if m.value else 0.0)


# ----------------------------------------------------------------------------------------------
# Metrics over logits [..., V] (one table of tolerances: nemoh.conformance.tolerances)
# ----------------------------------------------------------------------------------------------

def logit_metrics(out: torch.Tensor, ref: torch.Tensor, dtype: str, label: str,
                  positions: torch.Tensor | None = None, judged: bool = True,
                  baseline: dict[str, float] | None = None, baseline_label: str = "",
                  cross: bool = False) -> tuple[list[Metric], dict]:
    """max abs, rel max abs, NMSE, top-1 agreement and mean KL(ref || out) over the positions
    selected by the boolean `positions` [...] (default all), plus the worst position.

    At a dtype with dtype-relative rows (bf16, fp16), `baseline` holds the same metrics for the
    reference implementation at that dtype against the same `ref` (`baseline_label` names it): NMSE, KL
    and top-1 are then judged as at most k x the baseline + eps (nemoh.conformance.tolerances). Without
    a baseline they are judged against the table's fixed floors. `cross`: `ref` is itself the reference
    implementation at the dtype, and `baseline` its distance to fp64 (see relative_tolerance)."""
    from nemoh.conformance.tolerances import is_relative, relative_tolerance

    o, r = out.double(), ref.double()
    if positions is not None:
        o, r = o[positions], r[positions]
    o, r = o.reshape(-1, o.shape[-1]), r.reshape(-1, r.shape[-1])
    diff = (o - r).abs()
    per_pos = diff.amax(-1)
    scale = r.abs().max().item() or 1.0
    values = {"logits_nmse": ((o - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-300)).item(),
              "logits_top1": (o.argmax(-1) == r.argmax(-1)).double().mean().item(),
              "logits_kl": torch.sum(torch.softmax(r, -1) * (torch.log_softmax(r, -1) - torch.log_softmax(o, -1)),
                                     -1).mean().item()}

    def judged_metric(name: str) -> Metric:
        hib = name == "logits_top1"
        if not judged:
            return Metric(name, values[name], None, higher_is_better=hib, label=label)
        if baseline is not None and is_relative(name, dtype):
            return Metric(name, values[name], relative_tolerance(name, dtype, baseline[name], len(o), cross=cross),
                          higher_is_better=hib, label=label, baseline=baseline[name], baseline_label=baseline_label)
        return Metric(name, values[name], tol(name, dtype), higher_is_better=hib, label=label)

    ms = [
        Metric("logits_max_abs", diff.max().item(), None, label=label),
        Metric("logits_rel_max_abs", diff.max().item() / scale, tol("logits_rel_max_abs", dtype) if judged else None,
               label=label),
        judged_metric("logits_nmse"),
        judged_metric("logits_top1"),
        judged_metric("logits_kl"),
    ]
    worst = int(per_pos.argmax())
    return ms, {"worst_position": worst, "worst_position_max_abs": per_pos[worst].item()}


def metric_values(metrics: Sequence[Metric]) -> dict[str, float]:
    return {m.name: m.value for m in metrics}


def nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum (out - ref)^2 / sum ref^2, in fp64 (0 when both are zero)."""
    o, r = out.double(), ref.double()
    den = r.pow(2).sum().item()
    num = (o - r).pow(2).sum().item()
    return num / den if den else num


def equiv_metrics(out: torch.Tensor, ref: torch.Tensor, dtype: str, label: str, logits: bool = True) -> list[Metric]:
    """The same executor run two ways. Max-abs is judged where rounding is small (fp32/fp64); at
    bf16/fp16 one near-tie expert flip moves a token by O(1), so NMSE and top-1 are judged there."""
    from nemoh.conformance.tolerances import rel_max_abs

    ms = [Metric("equiv_rel_max_abs", rel_max_abs(out, ref), tol("equiv_rel_max_abs", dtype), label=label),
          Metric("equiv_nmse", nmse(out, ref), tol("equiv_nmse", dtype), label=label)]
    if logits:
        agree = top1_agreement_up_to_rounding(out, ref, dtype)
        ms.append(Metric("equiv_top1", agree, tol("equiv_top1", dtype), higher_is_better=True, label=label))
    return ms


#: the relative resolution of a logit at each 16-bit dtype (one ulp: 2^-8 bf16, 2^-11 fp16)
ULP = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def top1_agreement_up_to_rounding(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> float:
    """The share of positions whose argmax agrees. At bf16/fp16 a position where the two runs pick different
    tokens whose logits lie within two ulps of the dtype on both sides (relative to the largest logit there) is
    a rounding tie, not a disagreement: the same executor computing the same logits in another order rounds
    such a pair either way. A bug moves logits by far more than two ulps, so it still disagrees."""
    a, b = out.argmax(-1), ref.argmax(-1)
    same = a == b
    if dtype in ULP and not bool(same.all()):
        o, r = out.double(), ref.double()
        scale = torch.maximum(o.abs().amax(-1), r.abs().amax(-1))
        ref_margin = (r.gather(-1, b[..., None]) - r.gather(-1, a[..., None]))[..., 0]
        out_margin = (o.gather(-1, a[..., None]) - o.gather(-1, b[..., None]))[..., 0]
        tie = (ref_margin <= 2 * ULP[dtype] * scale) & (out_margin <= 2 * ULP[dtype] * scale)
        same = same | tie
    return same.double().mean().item()


def state_metrics(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: str,
                  label: str) -> list[Metric]:
    """Per kind of carried state (conv, ssm, k, v), the metrics of its worst layer."""

    worst: dict[str, tuple[float, str]] = {}
    ms = []
    for k in ref:
        if k == "mask":
            continue
        kind = k.rsplit(".", 1)[-1]
        if k not in out or out[k].shape != ref[k].shape:
            got = list(out[k].shape) if k in out else "missing"
            ms.append(Metric("state_shape_ok", 0.0, 1.0, higher_is_better=True,
                             label=f"{label} state {k} ({got} vs {list(ref[k].shape)})"))
            continue
        v = nmse(out[k], ref[k])
        if kind not in worst or not v <= worst[kind][0]:  # NaN counts as worst
            worst[kind] = (v, k)
    for _kind, (_v, name) in sorted(worst.items()):
        ms += equiv_metrics(out[name], ref[name], dtype, f"{label} state {name}", logits=False)
    if out.get("mask") is not None and ref.get("mask") is not None and not torch.equal(out["mask"], ref["mask"]):
        ms.append(Metric("state_mask_equal", 0.0, 1.0, higher_is_better=True, label=f"{label} key mask"))
    return ms


@dataclass(frozen=True)
class Suite:
    """A named list of cases, the function that runs one, and (for localisation) the sequence of
    forward calls `[(ids [B, T], mask or None), ...]` on one fresh state that reproduces a result."""

    name: str
    doc: str
    cases: Callable[[Any], list[Case]]  # (ctx) -> cases
    run: Callable[[Case, Any], Result]  # (case, ctx) -> result
    # (result, ctx) -> the forward calls to replay, or {side: forwards} for an equivalence case, whose
    # bug may be on either side (localisation replays each until it finds where the divergence starts)
    scenario: Callable[[Result, Any], list[tuple[Any, Any]] | dict[str, list[tuple[Any, Any]]]] | None = None
    order: int = 100  # where it stands in reports: cheap, fundamental suites first
