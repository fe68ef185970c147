"""Fuzzing what a user types: ``--config`` YAML and the command line.

* ``--config`` YAML is generated as text -- random nesting, anchors and aliases (self-referencing ones and
  alias bombs among them), tags (``!!python/object``, ``!!binary``, ``!foo`` ...), every scalar type YAML has
  (huge integers, ``.nan`` / ``.inf``, dates, nulls, booleans), preftune's option names, TRL's and unknown
  ones -- and read the way ``preftune train --config`` and ``preftune eval --config`` read it
  (:func:`preftune.cli.main.config_from_args`, :func:`preftune.cli.eval.eval_config_from_args`, then
  ``validate``). Each example gives a config or one :class:`ConfigError` line naming the file, within a
  time bound and a bound on the memory it allocates.
* The command line is generated from the parser's own flags (``train``, ``eval``, ``generate``, ``data ...``,
  ``label ...``, ``compare``) with values, choices and junk, and run through
  :func:`preftune.cli.main.main`. Each exits 0, or 1 / 2 with one ``preftune...: error:`` line and no
  traceback. Nothing trains or loads a model: the functions that would (training, evaluation, sampling,
  the label server, a sweep's runs) are replaced by a stub that stops there, and every model or data path
  is absolute (never a hub name).

Deterministic (``derandomize``, no example database) and sized to run in the default suite in well
under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import signal
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.cli.eval import eval_config_from_args
from preftune.cli.main import build_parser, config_from_args, main
from preftune.config.eval_config import EvalConfig
from preftune.config.train_config import TrainConfig
from preftune.config.trl_names import MATCHED, NO_EFFECT, RENAMED, TRL_NAMES
from preftune.config.values import ConfigError

SECONDS = 5.0  # one YAML example at most (a small config reads in milliseconds; an alias bomb must not take longer)
CLI_SECONDS = 20.0  # one command line at most (the first of a command imports its modules)
MEGABYTES = 48  # Python memory one YAML example may allocate at its peak (an expanded bomb takes gigabytes)
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])  # settings(**FUZZ)
PARSER = build_parser()


@contextmanager
def bounded(seconds: float = SECONDS, megabytes: float | None = MEGABYTES):
    """Run the body under a wall-clock alarm (TimeoutError past ``seconds``) and, with ``megabytes``,
    fail when the Python memory it allocated peaked above that (tracemalloc)."""

    def too_long(signum, frame):
        raise TimeoutError(f"an example ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    if megabytes is not None:
        tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1] if megabytes is not None else 0
        tracemalloc.stop()
    assert peak < (megabytes or 0) * 2**20 or megabytes is None, f"peak {peak / 2**20:.0f} MB"


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# --config YAML, generated as text
# ------------------------------------------------------------------------------------------------

OWN_NAMES = sorted({f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(EvalConfig)})
TRL_KEYS = sorted(set(RENAMED) | set(MATCHED) | set(NO_EFFECT) | {"bf16", "fp16", "loss_type", "use_peft",
                                                                  "eval_strategy", "save_strategy", "dataset_name",
                                                                  "dataset_train_split", "dataset_test_split"})
OTHER_TRL = sorted(TRL_NAMES - set(TRL_KEYS) - set(OWN_NAMES))[:40]
KEYS = (st.sampled_from(OWN_NAMES) | st.sampled_from(TRL_KEYS) | st.sampled_from(OTHER_TRL)
        | st.sampled_from(["betta", "learning-rate", "max-steps", "LOSS", "unknown", "<<"])
        | st.text(max_size=8).map(json.dumps)  # any text, double-quoted (JSON is YAML)
        | st.sampled_from(["1", "null", "~", "true", "[a, b]", "{a: 1}", "? x"]))  # keys that are no text
WORDS = ["dpo", "ipo", "kto", "sft", "sigmoid", "orpo", "simpo", "cosine", "linear", "constant", "float32",
         "bfloat16", "auto", "bf16", "no", "on", "off", "latest", "all-linear", "q_proj,v_proj", "none",
         "tensorboard", "wandb", "adamw_torch", "keep_start", "steps", "epoch", "/nonexistent/preftune-fuzz/x"]
NUMBER_WORDS = [".nan", ".NaN", ".inf", "-.inf", "+.inf", "1e999", "-1e999", "1e-999", "0x1F", "0o17", "0b101",
                "1_000", "190:20:30", "1.5e3", "-0.0", "0.1", "0", "-1", "1", "2", "0.5", "1e5", "1.0e+5",
                "9" * 4400]  # past Python's 4,300-digit limit for int(text)
PLAIN = ["null", "~", "", "true", "false", "yes", "no", "on", "off", "Y", "N", "2024-01-01", "2024-13-45",
         "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "=", "|", ">-\n  folded"]
SCALARS = (st.integers(-10**6, 10**6).map(str)
           | st.integers(10**19, 10**80).map(str)  # past int64 and float64
           | st.floats(allow_nan=False, allow_infinity=False).map(repr)
           | st.sampled_from(NUMBER_WORDS) | st.sampled_from(PLAIN) | st.sampled_from(WORDS)
           | st.text(max_size=12).map(json.dumps))
TAGS = ["!!python/object:os.system", "!!python/object/apply:os.system", "!!python/name:os.system",
        "!!python/tuple", "!!python/object/new:dict", "!!binary", "!!str", "!!int", "!!float", "!!bool", "!!null",
        "!!set", "!!omap", "!!pairs", "!!timestamp", "!!map", "!!seq", "!foo", "!bar:baz", "!<tag:x,2024:y>",
        "!<tag:yaml.org,2002:str>", "!"]


@st.composite
def yaml_node(draw, anchors: list[str], depth: int = 0) -> str:
    """A flow-style YAML node as text: a scalar, an alias of an anchor defined before it (or of one never
    defined), or a list / mapping of nodes; maybe anchored, maybe tagged."""
    kinds = ["scalar", "alias"] + (["list", "map"] if depth < 4 else [])
    kind = draw(st.sampled_from(kinds))
    anchor = f"a{len(anchors)}" if draw(st.integers(0, 3)) == 0 else None
    if anchor and draw(st.booleans()):
        anchors.append(anchor)  # defined before its own children: they may refer to it (a recursive value)
    if kind == "scalar" or (kind == "alias" and not anchors):
        text = draw(SCALARS)
    elif kind == "alias":
        text = "*" + (draw(st.sampled_from(anchors)) if draw(st.integers(0, 9)) else "undefined")
        anchor = None  # an alias takes no anchor or tag
    elif kind == "list":
        items = draw(st.lists(yaml_node(anchors, depth + 1), max_size=4))
        text = "[" + ", ".join(items) + "]"
    else:
        pairs = draw(st.lists(st.tuples(KEYS, yaml_node(anchors, depth + 1)), max_size=4))
        text = "{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"
    if anchor is None:
        return text
    tag = draw(st.sampled_from(TAGS)) + " " if draw(st.integers(0, 3)) == 0 else ""
    if anchor not in anchors:
        anchors.append(anchor)
    return f"&{anchor} {tag}{text}"


@st.composite
def alias_bomb(draw) -> str:
    """Anchors of anchors: ``&b1 [*b0, *b0, ...]`` ``depth`` levels deep, ``width`` wide (width^depth values)."""
    depth, width = draw(st.integers(2, 9)), draw(st.integers(2, 9))
    levels = ["&b0 [" + ", ".join(['"lol"'] * width) + "]"]
    levels += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "[" + ", ".join(levels) + "]"


@st.composite
def yaml_document(draw) -> str:
    """A config file: mostly a block mapping of key: node lines; sometimes another kind of document."""
    anchors: list[str] = []
    shape = draw(st.sampled_from(["mapping"] * 6 + ["node", "documents", "directive", "bomb"]))
    if shape == "node":
        return draw(yaml_node(anchors)) + "\n"
    lines = [f"{key}: {draw(yaml_node(anchors))}" for key in draw(st.lists(KEYS, max_size=6))]
    if shape == "bomb":
        lines.insert(draw(st.integers(0, len(lines))), f"{draw(st.sampled_from(OWN_NAMES + TRL_KEYS))}: "
                                                       f"{draw(alias_bomb())}")
    if anchors and draw(st.booleans()):
        lines.append(f"<<: *{draw(st.sampled_from(anchors))}")  # a merge key
    text = "\n".join(lines) + "\n"
    if shape == "documents":
        text += "---\n" + text
    elif shape == "directive":
        text = "%YAML 1.1\n---\n" + text
    return text


def read_config(path: Path, command: str):
    """``preftune train|eval --config PATH``'s config, validated (its required paths not asked for)."""
    if command == "train":
        return config_from_args(PARSER.parse_args(["train", "--config", str(path)])).validate(require_io=False)
    missing = "/nonexistent/preftune-fuzz/x"  # eval's parser asks for --model and --data
    return eval_config_from_args(PARSER.parse_args(["eval", "--config", str(path), "--model", missing, "--data",
                                                    missing]))


def check_config_file(path: Path) -> None:
    """Both commands read ``path`` to a config or one ConfigError line naming it, in bounded time and memory."""
    for command in ("train", "eval"):
        with bounded():
            try:
                read_config(path, command)
            except ConfigError as err:
                message = str(err)
                assert "\n" not in message and len(message) < 2000, message[:300]
                assert str(path) in message, (command, message)


@settings(max_examples=200, **FUZZ)
@given(text=yaml_document())
def test_config_yaml_gives_a_config_or_one_line_naming_the_file(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    before = max_rss_mb()
    check_config_file(path)
    assert max_rss_mb() - before < 256


@pytest.fixture
def no_training(monkeypatch):
    """Replace everything past argument checking and config building that would train, load a model, serve
    or launch: each stub raises :class:`StopBeforeLoading` (not an error of the command)."""
    import preftune.cli.main as cli_main
    import preftune.evaluation.evaluate as evaluate
    import preftune.evaluation.pairs as pairs
    import preftune.evaluation.sweep as sweep
    import preftune.training.loop as loop

    def stop(*args, **kwargs):
        raise StopBeforeLoading

    def compare(path):
        sweep.load_sweep(path)  # the sweep file is read and checked; its runs are not started
        raise StopBeforeLoading

    for module, name in ((loop, "train"), (evaluate, "evaluate_model"), (pairs, "onpolicy_pairs"),
                         (pairs, "onpolicy_candidates")):
        monkeypatch.setattr(module, name, stop)
    try:
        import preftune.collect.server as server
    except ImportError:  # without the label extra, `label serve` says so in one line and serves nothing
        pass
    else:
        monkeypatch.setattr(server, "serve", stop)
    monkeypatch.setattr(sweep, "run_compare", compare)
    monkeypatch.setattr(cli_main, "needs_launch", lambda cfg: False)  # --num-processes 2 must not launch torchrun


class StopBeforeLoading(Exception):
    """Raised by the stubs of :func:`no_training`: the command got as far as loading or training."""


ERROR_LINE = re.compile(r"^preftune(?: [\w-]+)*: error: ")


def run_cli(argv: list[str], capsys) -> tuple[int | str, str, str]:
    """``preftune ARGV`` -> (exit code, or "stub" where it reached a stub; stdout; stderr)."""
    with bounded(CLI_SECONDS, megabytes=None):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage and one error line (2), or --help / --version (0)
            code = exc.code
        except StopBeforeLoading:
            code = "stub"
    out, err = capsys.readouterr()
    return code, out, err


def check_outcome(argv: list[str], code, out: str, err: str) -> None:
    """Exit 0, or 1 / 2 with one error line and nothing else on stderr but argparse's usage lines (or, exit 1
    without an error line, the command's own report on stdout)."""
    assert "Traceback" not in err, (argv, err)
    if code in (0, "stub"):
        return
    assert code in (1, 2), (argv, code, err)
    said = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert (len(said) == 1 and ERROR_LINE.match(said[0])) or (not said and code == 1 and out.strip()), \
        (argv, code, err)


@settings(max_examples=20, **FUZZ)
@given(text=yaml_document())
def test_config_yaml_through_the_command_exits_0_or_2_with_one_line(tmp_path, capsys, no_training, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    argv = ["train", "--config", str(path), "--model", "/nonexistent/preftune-fuzz/m", "--data",
            "/nonexistent/preftune-fuzz/d.jsonl", "--output-dir", str(tmp_path / "out")]
    code, out, err = run_cli(argv, capsys)
    assert code in ("stub", 2), (text, code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("preftune: error: "), (text, err)


# ------------------------------------------------------------------------------------------------
# command lines, from the parser's own flags
# ------------------------------------------------------------------------------------------------

# Options and positionals naming a file or folder read or written: only the paths of PATHS (absolute, in the
# test's folder or nowhere) are given to them, never a word that could be a hub name.
PATH_DESTS = {"model", "ref_model", "tokenizer", "data", "eval_data", "nll_data", "resume_from", "config",
              "output_dir", "ref_cache_dir", "accelerate_config", "base_cache", "output", "prompts", "out", "db",
              "candidates", "guidelines", "path", "eval_path", "src", "dst", "train", "eval", "gguf", "model_dir",
              "hh_data", "cache_dir"}
PATHS = ["{tmp}/pairs.jsonl", "{tmp}/junk.bin", "{tmp}/config.yaml", "{tmp}/sweep.yaml", "{tmp}/labels.sqlite",
         "{tmp}/new/out.jsonl", "{tmp}", "/nonexistent/preftune-fuzz/x", "/nonexistent/preftune-fuzz/x.jsonl"]
JUNK = ["", "-1", "0", "1", "2", "0.5", "nan", "inf", "-inf", "1e999", "1e-999", "abc", "none", "null", "true",
        "false", "dpo", "kto", "latest", "cosine", "float16", "--", "-", "é", "1,2", " 3 ", "9" * 30, "\x7f",
        "python:", "nope:x", "reward-model:/nonexistent/preftune-fuzz/rm", "chosen", "score"]
# Commands whose runs could take long or reach the network are left out: quickstart trains, model fetch
# downloads, model convert / export convert weights.
COMMANDS = [("train",), ("eval",), ("generate",), ("compare",), ("data", "check"), ("data", "convert"),
            ("data", "split"), ("data", "pairs"), ("label", "serve"), ("label", "stats"), ("label", "export")]


def subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = PARSER
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


CONFIG_FIELDS = {f.name: f for config in (TrainConfig, EvalConfig) for f in dataclasses.fields(config)}


def good_values(action: argparse.Action) -> list[str]:
    """Values the option takes (its choices, its config field's default, small numbers its type accepts), so
    that a command line often gets past one bad value to the next check."""
    if action.choices:
        return [str(c) for c in action.choices]
    field = CONFIG_FIELDS.get(action.dest)
    values = [str(field.default)] if field is not None and field.default not in (None, False, True) else []
    for text in ("1", "2", "8", "0.5", "0.1"):
        try:
            (action.type or str)(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            continue
        values.append(text)
    return values or JUNK


def value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.dest in PATH_DESTS:
        return st.sampled_from(PATHS)
    return st.sampled_from(good_values(action)) | st.sampled_from(JUNK)


def flag_strategy(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    """One use of an option: mostly the flag and a value (``--flag value`` or ``--flag=value``), sometimes the
    flag alone."""
    flag = st.sampled_from(action.option_strings)
    if action.nargs == 0:
        return flag.map(lambda f: [f])
    value = value_for(action)
    return st.tuples(flag, value, st.sampled_from(["two words"] * 6 + ["joined"] * 2 + ["flag alone"])).map(
        lambda t: [t[0], t[1]] if t[2] == "two words" else [f"{t[0]}={t[1]}"] if t[2] == "joined" else [t[0]])


# Options a command needs to get past its checks (argparse's required ones, and train's three).
NEEDED = {"model", "data", "output_dir"}


def command_line(path: tuple[str, ...]) -> st.SearchStrategy[list[str]]:
    """``path``, its positionals (mostly as many as it takes), its required options (mostly given), then any
    of its options in any order, and sometimes a junk word."""
    parser = subparser(path)
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    positionals = [a for a in parser._actions if not a.option_strings
                   and not isinstance(a, argparse._SubParsersAction)]
    required = [a for a in options if a.required or (path == ("train",) and a.dest in NEEDED
                                                      and a.option_strings[0].startswith("--"))]
    required = list({a.dest: a for a in required}.values())  # train's --data and its alias --data: one
    junk = st.sampled_from([["--nope"], ["-x"], ["--"], ["extra"], ["--model="], ["--beta=0.1"], ["-q"],
                            ["--help"], ["--learning_rate", "1e-5"], ["--lr", "1"]])
    count = st.sampled_from([len(positionals)] * 6 + [max(0, len(positionals) - 1), len(positionals) + 1])
    given_positionals = count.flatmap(lambda n: st.lists(st.sampled_from(PATHS), min_size=n, max_size=n))
    needed = st.tuples(*[st.tuples(st.just(a.option_strings[0]), value_for(a)).map(list) for a in required])
    given_needed = st.tuples(st.integers(0, 5), needed).map(lambda t: list(t[1]) if t[0] else list(t[1])[1:])
    parts = st.lists(st.sampled_from(options).flatmap(flag_strategy), max_size=6) if options else st.just([])
    extra = st.sampled_from([[]] * 5 + [[0]]).flatmap(lambda e: st.lists(junk, min_size=len(e), max_size=len(e)))
    return st.tuples(given_positionals, given_needed, parts, extra).map(
        lambda t: [*path, *t[0], *[w for part in t[1] + t[2] + t[3] for w in part]])


def fill(argv: list[str], tmp: Path) -> list[str]:
    return [word.replace("{tmp}", str(tmp)) for word in argv]


@pytest.fixture
def cli_folder(tmp_path, monkeypatch) -> Path:
    """The working folder of the command lines (relative outputs land here), with the files PATHS name."""
    rows = [{"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "junk.bin").write_bytes(bytes(range(256)))
    (tmp_path / "config.yaml").write_text("beta: 0.2\nloss: ipo\nmax_steps: 3\n")
    (tmp_path / "sweep.yaml").write_text(f"base: /nonexistent/preftune-fuzz/m\ndata: {tmp_path}/pairs.jsonl\n"
                                         f"eval_data: {tmp_path}/pairs.jsonl\noutput_dir: {tmp_path}/sweep\n"
                                         "variants:\n  - {name: a, beta: 0.1}\n  - {name: b, beta: -1}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@settings(max_examples=300, **FUZZ)
@given(argv=st.sampled_from(COMMANDS).flatmap(command_line))
def test_command_lines_exit_0_1_or_2_with_one_error_line(cli_folder, capsys, no_training, argv):
    argv = fill(argv, cli_folder)
    code, out, err = run_cli(argv, capsys)
    check_outcome(argv, code, out, err)


# ------------------------------------------------------------------------------------------------
# the Python API: preftune.train(**options), preftune.evaluate(model, data, **options)
# ------------------------------------------------------------------------------------------------

PY_VALUES = (st.none() | st.booleans() | st.integers() | st.integers(2**63, 2**200) | st.floats()
             | st.text(max_size=8) | st.binary(max_size=4) | st.sampled_from(WORDS + NUMBER_WORDS[:8])
             | st.builds(Path, st.sampled_from(["/nonexistent/preftune-fuzz/x", "rel/x", ""]))
             | st.lists(st.integers() | st.text(max_size=3), max_size=3)
             | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
             | st.builds(object) | st.just(float) | st.tuples(st.integers()))
API_NAMES = st.sampled_from(OWN_NAMES) | st.sampled_from(TRL_KEYS) | st.sampled_from(["betta", "lr", ""])


@settings(max_examples=100, **FUZZ)
@given(options=st.dictionaries(API_NAMES, PY_VALUES, max_size=5), which=st.sampled_from(["train", "evaluate"]),
       config=st.none() | PY_VALUES)
def test_python_api_gives_a_result_or_one_config_error(no_training, options, which, config):
    """Any keywords of any Python type: the call gets as far as training / evaluating (the stub), or raises one
    ConfigError line; never a TypeError or another exception."""
    import preftune

    options = {"model": "/nonexistent/preftune-fuzz/m", "data": "/nonexistent/preftune-fuzz/d.jsonl",
               "output_dir": "/nonexistent/preftune-fuzz/out", **options}
    with bounded(CLI_SECONDS, megabytes=None):
        try:
            if which == "train":
                preftune.train(config, **options)
            else:
                options.pop("output_dir", None)
                preftune.evaluate(options.pop("model"), options.pop("data"), **options)
        except ConfigError as err:
            assert "\n" not in str(err) and len(str(err)) < 2000, str(err)[:300]
        except StopBeforeLoading:
            pass
