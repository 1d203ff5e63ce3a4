"""The backend-neutral runtime (nemoh.runtime.session): input validation before any backend sees the
data, and the `nemoh generate` command on top of it."""

from __future__ import annotations

import pytest
import torch
from model_checks import open_cached

from nemoh.errors import InputError


def model(name: str, dtype: str):
    return open_cached(name, dtype, "torch")


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[1, 2, 512]]), r"token id 512 at \[0, 2\] is out of range \[0, 512\)"),
    (torch.tensor([[1, -1]]), r"token id -1 at \[0, 1\]"),
    (torch.tensor([[1.0, 2.0]]), "must be integers"),
    (torch.zeros(1, 0, dtype=torch.int64), "tokens >= 1"),
    (torch.ones(2, 3, 4, dtype=torch.int64), "shape"),
])
def test_bad_token_ids(bad, match):
    with pytest.raises(InputError, match=match):
        model("tiny-dense", "float32").session(bad.shape[0] if bad.dim() == 2 else 1).forward(bad)


def test_bad_masks():
    s = model("tiny-dense", "float32").session(1)
    with pytest.raises(InputError, match="shape"):
        s.forward(torch.ones(1, 4, dtype=torch.int64), torch.ones(1, 3))
    with pytest.raises(InputError, match="only 0"):
        s.forward(torch.ones(1, 3, dtype=torch.int64), torch.tensor([[0, 2, 1]]))
    with pytest.raises(InputError, match="left padding"):
        s.forward(torch.ones(1, 3, dtype=torch.int64), torch.tensor([[1, 0, 1]]))
    s.forward(torch.ones(1, 2, dtype=torch.int64), torch.tensor([[0, 1]]))
    with pytest.raises(InputError, match="left padding"):  # padding after real tokens, across chunks
        s.forward(torch.ones(1, 2, dtype=torch.int64), torch.tensor([[0, 1]]))


def test_cli_out_of_range_ids_exit_2(capsys):
    from nemoh.cli import main

    assert main(["generate", "tiny-dense", "--ids", "1,2,9999", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "9999" in err and "vocab_size 512" in err


def test_cli_generate_text_round_trip(capsys):
    from nemoh.cli import main

    assert main(["generate", "tiny-moe", "--prompt", "Two plus two is", "-n", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Two plus two is") and len(out) > len("Two plus two is")
