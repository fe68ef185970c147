"""Reading YAML configs: an alias bomb is refused in one line before anything is built from it, a config
using anchors and aliases the ordinary way still loads, and every value an error message shows is short."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import preftune
from preftune.config.train_config import TrainConfig
from preftune.config.values import ConfigError, check_field, describe
from preftune.config.yaml import MAX_DEPTH, MAX_NODES, load_yaml

MEMORY_LIMIT = 1536 * 2**20  # bytes of address space for the child: the bomb expanded needs gigabytes

# The child: a memory-limited process that runs `preftune ...` through the CLI's main() and prints how long
# main() took. Under the limit, expanding a bomb ends in MemoryError instead of swapping the machine.
CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from preftune.cli.main import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(f"main took {{time.perf_counter() - start:.3f}} s")
sys.exit(code)
"""


def alias_bomb(key: str, depth: int) -> str:
    """A few hundred bytes of YAML whose ``key`` expands to 9**depth strings (each anchor lists the previous
    one nine times)."""
    parts = ['&l0 ["lol"' + ',"lol"' * 8 + "]"]
    parts += ["&l%d [%s]" % (i, ",".join(["*l%d" % (i - 1)] * 9)) for i in range(1, depth)]
    return f"{key}: [" + ", ".join(parts) + "]\n"


def run_cli_limited(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """``preftune *args`` in a child under MEMORY_LIMIT: (exit status, stderr, seconds main() took)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(preftune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(limit=MEMORY_LIMIT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    took = [line for line in proc.stdout.splitlines() if line.startswith("main took")]
    return proc.returncode, proc.stderr, float(took[0].split()[2]) if took else float("inf")


@pytest.mark.parametrize("key, depth", [("beta", 9), ("lora_target_modules", 7)])
def test_alias_bomb_is_refused_in_one_line(tmp_path, key, depth):
    # beta: the type error used to repr() the expanded value (gigabytes, MemoryError traceback);
    # lora_target_modules (TRL's name): it used to be accepted and written out as a 51 MB config.yaml.
    text = alias_bomb(key, depth)
    assert len(text) < 500
    (tmp_path / "bomb.yaml").write_text(text)
    code, err, took = run_cli_limited(["train", "--config", "bomb.yaml", "--model", "m", "--data", "pairs.jsonl",
                                       "--output-dir", "out", "--max-steps", "1"], tmp_path)
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert lines[0] == (f"preftune: error: bomb.yaml:1: more than {MAX_NODES:,} values under '{key}' once its "
                        f"YAML aliases are expanded; a config needs far fewer (an alias bomb?)")
    assert took < 5, took
    assert not (tmp_path / "out").exists()


def test_alias_bomb_is_refused_by_eval_config(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb("max_length", 9))
    code, err, took = run_cli_limited(["eval", "--config", "bomb.yaml", "--model", "m", "--data", "d"], tmp_path)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"preftune: error: bomb.yaml:1: more than {MAX_NODES:,} values under 'max_length'")
    assert took < 5, took


def test_too_deep_and_self_containing_yaml_are_refused(tmp_path):
    (tmp_path / "deep.yaml").write_text("a: 1\nbeta: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n")
    with pytest.raises(ConfigError, match=rf"deep.yaml:2: nested more than {MAX_DEPTH} levels deep under 'beta'"):
        load_yaml(tmp_path / "deep.yaml")
    (tmp_path / "loop.yaml").write_text("beta: &a [*a]\n")
    with pytest.raises(ConfigError, match="loop.yaml:1: nested more than"):
        load_yaml(tmp_path / "loop.yaml")
    (tmp_path / "wide.yaml").write_text("beta: [" + ", ".join(["1"] * (MAX_NODES + 1)) + "]\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_NODES:,} values under 'beta'"):
        load_yaml(tmp_path / "wide.yaml")


def test_anchors_and_aliases_in_a_real_config_still_load(tmp_path):
    (tmp_path / "m.yaml").write_text("base: &base {beta: 0.3, loss: ipo}\n"
                                     "run: {<<: *base, beta: 0.2}\n"
                                     "steps: &s [10, 20, 30]\nagain: *s\n")
    assert load_yaml(tmp_path / "m.yaml") == {"base": {"beta": 0.3, "loss": "ipo"}, "run": {"beta": 0.2, "loss": "ipo"},
                                              "steps": [10, 20, 30], "again": [10, 20, 30]}
    (tmp_path / "c.yaml").write_text("beta: &b 0.2\nlabel_smoothing: *b\n"
                                     "lora_target_modules: &mods [q_proj, v_proj]\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (cfg.beta, cfg.label_smoothing, cfg.lora_targets) == (0.2, 0.2, "q_proj,v_proj")
    # a long list well under the cap loads
    (tmp_path / "long.yaml").write_text("xs: [" + ", ".join(["1"] * 5000) + "]\n")
    assert len(load_yaml(tmp_path / "long.yaml")["xs"]) == 5000


def test_an_integer_yaml_cannot_build_is_one_config_error(tmp_path):
    (tmp_path / "big.yaml").write_text("beta: 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError, match="big.yaml:1: invalid YAML value !!int "):
        load_yaml(tmp_path / "big.yaml")


def test_describe_is_short_and_stops_early():
    bomb: list = ["lol"] * 9
    for _ in range(30):  # 9**31 strings once expanded: only a lazy walk can describe it
        bomb = [bomb] * 9
    start = time.perf_counter()
    shown = describe(bomb)
    assert time.perf_counter() - start < 0.1
    assert len(shown) <= 80 and shown.startswith("[[[[") and shown.endswith("...")
    loop: list = [1]
    loop.append(loop)
    assert len(describe(loop)) <= 80
    assert len(describe("x" * 10**7)) <= 80 and len(describe(10**5000)) <= 80
    assert len(describe({"k": bomb}, 40)) <= 40
    for small in (["q_proj", "v_proj"], {"a": (1,)}, (), set(), frozenset({2}), "it's", 1.5, None, True, b"ab"):
        assert describe(small) == repr(small)


def test_a_wrong_type_value_is_one_short_line():
    beta = next(f for f in dataclasses.fields(TrainConfig) if f.name == "beta")
    huge = "a\nb" * 100_000
    with pytest.raises(ConfigError) as info:
        check_field(beta, huge)
    assert len(str(info.value)) < 120 and "\n" not in str(info.value)
    nested: list = ["x"] * 9
    for _ in range(20):
        nested = [nested] * 9
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"beta": nested, "batch_size": 2})
    assert len(str(info.value)) < 120 and "\n" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"lr_scheduler_type": nested})
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)


def test_a_yaml_list_for_a_comma_separated_option_is_its_text(tmp_path):
    """``lora_targets: [q_proj, v_proj]`` means ``q_proj,v_proj`` (it once became the text "['q_proj', 'v_proj']"
    and failed after the model loaded); a list for a plain text option is one ConfigError line."""
    from preftune.config.train_config import TrainConfig
    from preftune.config.values import ConfigError

    path = tmp_path / "lists.yaml"
    path.write_text("lora_targets: [q_proj, v_proj]\nreport_to: [tensorboard]\nloss: sigmoid,sft\n"
                    "loss_weights: [0.8, 1]\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lora_targets, cfg.report_to, cfg.loss_weights) == ("q_proj,v_proj", "tensorboard", "0.8,1")
    assert TrainConfig.from_dict({"lora_targets": ("q_proj", "o_proj")}).lora_targets == "q_proj,o_proj"
    for bad in ({"lora_targets": [["q_proj"]]}, {"lora_targets": [True]}, {"model": ["a", "b"]},
                {"lr_scheduler": {"name": "cosine"}}):
        with pytest.raises(ConfigError, match=r"expects str, got [\[{]") as err:
            TrainConfig.from_dict(bad)
        assert "\n" not in str(err.value)


def test_a_config_that_is_a_folder_or_unreadable_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"^--config {tmp_path}: a folder, not a YAML file$"):
        TrainConfig.from_yaml(tmp_path)
    long_name = tmp_path / ("x" * 300 + ".yaml")
    with pytest.raises(ConfigError, match="cannot read it"):
        TrainConfig.from_yaml(long_name)


@pytest.mark.parametrize("text, says", [
    ("loss: dpo\nbeta: !!bool 0\n", "bad.yaml:2: invalid YAML value !!bool '0' (KeyError: '0')"),
    ("seed: !!timestamp 2024-99-99\n", "bad.yaml:1: invalid YAML value !!timestamp '2024-99-99' (ValueError: "),
    ("beta: [1, !!int 0x]\n", "bad.yaml:1: invalid YAML value !!int '0x' (ValueError: "),
])
def test_a_tagged_value_yaml_cannot_build_is_one_line_naming_its_line(tmp_path, text, says):
    """Each was a KeyError / ValueError traceback from PyYAML's constructor (found by the fuzz tests)."""
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_yaml(tmp_path / "bad.yaml")
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["`\n?x.yaml", "x" * 300 + ".yaml"])
def test_a_config_path_is_shown_on_one_short_line(tmp_path, name):
    """A newline in the file's name (found by tests/integration/test_fuzz.py) or a long name: one bounded line."""
    with pytest.raises(ConfigError) as err:
        preftune.train(str(tmp_path / name))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)
