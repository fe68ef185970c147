"""Checkpoint writes: a full disk or an unwritable folder is one line naming the path, and nothing torn is left.

The training runs use a tiny Llama (hidden 32) on 24 synthetic rule pairs, CPU, one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common.write_failures import deny_writes, fill_disk, one_error_line
from conftest import rule_pairs, train_argv, write_jsonl

from preftune.cli.main import main
from preftune.common import files
from preftune.common.files import CannotWriteError, DiskFullError
from preftune.model.tiny import tiny_model
from preftune.training import checkpoint as ckpt

# What torch's own writer raises when the disk fills under it (its C++ fwrite came up short).
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 216000 vs 215888"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoint")
    model_dir = folder / "model"
    tiny_model("llama", vocab_size=len(tiny_tokenizer), seed=0, hidden=32, heads=2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "train": write_jsonl(folder / "train.jsonl", rule_pairs(24, seed=3))}


def argv(setup, out: Path) -> list[str]:
    return train_argv(dict(model=str(setup["model"]), data=str(setup["train"]), output_dir=str(out), loss="dpo",
                           batch_size=4, max_steps=2, save_steps=2, max_length=48, max_prompt_length=24,
                           logging_steps=1, seed=0, progress=False, mixed_precision="no", quiet=True))


def parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def save(out: Path, step: int = 1) -> Path:
    model, optimizer, scheduler = parts()
    return ckpt.save_checkpoint(out, step, model.state_dict(), optimizer, scheduler, {"step": step}, keep=0)


def test_disk_full_writing_optimizer_pt_is_one_line_naming_the_path_and_the_space(setup, tmp_path, capsys):
    """Issue 33, finding 2: the disk filling up while torch wrote ``optimizer.pt`` gave torch's
    ``RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos`` traceback."""
    out = tmp_path / "run"
    with fill_disk(out, only="optimizer.pt"):
        assert main(argv(setup, out)) == 1
    line = one_error_line(capsys, ckpt.checkpoint_dir(out) / "step-000002.tmp-")
    assert line.startswith(f"preftune: error: no space left on device writing {ckpt.checkpoint_dir(out)}/")
    assert "(needs about " in line and " free); no earlier checkpoint is kept" in line
    assert list(ckpt.checkpoint_dir(out).iterdir()) == []  # the partial checkpoint was removed


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_torchs_own_short_write_message_counts_as_disk_full(tmp_path, monkeypatch, name):
    """The same as torch reports it when it writes the file itself: no OS error, only ``unexpected pos``;
    a full disk when less than the checkpoint's size is free."""
    real_save = torch.save

    def short_write(value, f, *args, **kwargs):
        if Path(getattr(f, "name", f)).name == name:
            raise RuntimeError(TORCH_SHORT_WRITE)
        return real_save(value, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(files, "free_bytes", lambda path: 100)
    with pytest.raises(DiskFullError) as full:
        save(tmp_path / "run")
    assert str(full.value).startswith(f"no space left on device writing {ckpt.checkpoint_dir(tmp_path / 'run')}/"
                                      "step-000001.tmp-")
    assert ", 100 bytes free); no earlier checkpoint is kept" in str(full.value)
    assert list(ckpt.checkpoint_dir(tmp_path / "run").iterdir()) == []


def test_an_unwritable_checkpoints_folder_is_one_line(tmp_path):
    """chmod 0o500 on ``OUTPUT/checkpoints`` (for root: the PermissionError the mode would give)."""
    save(tmp_path / "run", step=1)
    root = ckpt.checkpoint_dir(tmp_path / "run")
    with deny_writes(root), pytest.raises(CannotWriteError) as refused:
        save(tmp_path / "run", step=2)
    assert str(refused.value).startswith(f"cannot write {root}/step-000002.tmp-")
    assert str(refused.value).endswith(": permission denied")
    assert [p.name for p in root.iterdir()] == ["step-000001"]


def test_a_checkpoint_written_through_python_files_loads_the_same(tmp_path):
    """torch.save into a file Python opened writes what ``load_checkpoint`` reads (weights_only)."""
    model, optimizer, scheduler = parts()
    path = ckpt.save_checkpoint(tmp_path, 3, model.state_dict(), optimizer, scheduler, {"step": 3}, keep=0)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["state"] == {"step": 3}
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    saved = optimizer.state_dict()["state"][0]
    assert all(torch.equal(loaded["optimizer"]["state"][0][k], saved[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert loaded["scheduler"] == scheduler.state_dict()
    assert torch.equal(loaded["rng"]["ranks"][0]["torch"], torch.get_rng_state())
