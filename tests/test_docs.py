"""The documentation cannot drift from the software: README.md and docs/*.md name only
links, modules, flags, make targets, CI scripts and params that exist, state the committed
baseline's figures, and hold regenerated samples. Offline, no training."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from stages.common import PipelineError
from tools import docs_samples
from tools.paths import set_params

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Modules shown with `python -m` that are not this repository's.
EXTERNAL_MODULES = {"venv", "pip", "pytest"}

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC = re.compile(r"<img[^>]*\ssrc=\"([^\"]+)\"")
PYTHON_M = re.compile(r"\bpython3? -m ([\w.]+)((?:[^\n`\\]|\\\n)*)")
MAKE = re.compile(r"(?:^|[\s(`;&])make ([a-z][\w-]*)")
CI_SCRIPT = re.compile(r"\.ci/([\w.-]+)")
FILE_EXTENSIONS = {"py", "md", "json", "yaml", "yml", "csv", "png", "keras", "onnx", "txt"}


def code_of(text):
    """The text of every fenced block and inline code span, one string each."""
    blocks = FENCE.findall(text)
    rest = FENCE.sub("", text)
    return blocks + [m.group(2) for m in INLINE.finditer(rest)]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def broken_links(doc):
    """Relative links and images of `doc` that name no file, or no heading of it."""
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in LINK.findall(text) + HTML_SRC.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{doc.name}: {target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{doc.name}: {target} (no such heading)")
    return broken


def python_m_commands(text):
    """(module, [--flags]) for every `python -m MODULE ...` in the code of `text`; the
    flags end at a comment or the next command of a shell line."""
    found = []
    for code in code_of(text):
        for module, rest in PYTHON_M.findall(code):
            args = re.split(r"\s#|&&|\|\||;|\|", rest.replace("\\\n", " "))[0]
            found.append((module, re.findall(r"(?<![\w-])(--[\w][\w-]*)", args)))
    return found


CAPTURE = textwrap.dedent(
    """
    # Builds each module's argparse parser without running it: main() stops at parse_args.
    import argparse, importlib, json, sys

    class Parsed(BaseException):
        pass

    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    argparse.ArgumentParser.parse_known_args = capture
    options = {}
    for name in sys.argv[2:]:
        sys.argv[0] = name
        try:
            importlib.import_module(name).main()
            options[name] = "main() returned without parsing arguments"
        except Parsed as parsed:
            options[name] = sorted(parsed.args[0]._option_string_actions)
        except Exception as e:
            options[name] = f"{type(e).__name__}: {e}"
    with open(sys.argv[1], "w") as f:
        json.dump(options, f)
    """
)


@pytest.fixture(scope="module")
def shown_commands():
    """{module: set of flags shown after it} over README.md and docs/*.md."""
    shown = {}
    for doc in DOCS:
        for module, flags in python_m_commands(doc.read_text()):
            shown.setdefault(module, set()).update(flags)
    return shown


def module_file(name):
    """The file of repository module `name`, or None."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def parser_options(modules, tmp_path):
    out = tmp_path / "options.json"
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": str(Path(sys.executable).parent)}
    subprocess.run(
        [sys.executable, "-c", CAPTURE, str(out), *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def params_keys():
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    return {f"{section}.{key}" for section, values in doc.items() for key in values}


def mentioned_params(text, sections):
    names = "|".join(sections)
    pattern = rf"(?<![\w/.$-])({names})\.([a-z_]+)(?![\w(/-]|\.\w)"
    return {f"{s}.{k}" for s, k in re.findall(pattern, text) if k not in FILE_EXTENSIONS}


def makefile_targets():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, re.MULTILINE))


# --- links, commands, flags, targets, scripts, params ------------------------------------


def test_every_relative_link_and_image_resolves():
    broken = [b for doc in DOCS for b in broken_links(doc)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_a_missing_file_or_heading_is_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# Set one up\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[a](there.md) [b](there.md#set-one-up) ![c](gone.png) [d](there.md#nope) "
        "[e](https://example.com/x) [f](#top)\n```\n[g](in-code.md)\n```\n# Top\n"
    )
    assert broken_links(doc) == [
        "doc.md: gone.png (no such file)",
        "doc.md: there.md#nope (no such heading)",
    ]


def test_the_commands_are_read_from_code_with_their_flags():
    text = (
        "`python -m tools.predict *.png --json`  # one\n"
        "```bash\npython -m bench.x --run a 1 \\\n  --run b 2 --out d   # --not-this\n"
        "KERAS_BACKEND=jax python3 -m stages.train --data x && dvc exp run --queue\n```\n"
        "prose python -m not.code --nope\n"
    )
    assert python_m_commands(text) == [
        ("bench.x", ["--run", "--run", "--out"]),
        ("stages.train", ["--data"]),
        ("tools.predict", ["--json"]),
    ]


def test_every_python_m_module_shown_is_in_the_repository(shown_commands):
    missing = [m for m in shown_commands if m not in EXTERNAL_MODULES and module_file(m) is None]
    assert missing == []


def test_every_flag_shown_is_accepted_by_the_modules_parser(shown_commands, tmp_path):
    modules = sorted(m for m in shown_commands if m not in EXTERNAL_MODULES and module_file(m))
    options = parser_options(modules, tmp_path)
    problems = {m: options[m] for m in modules if isinstance(options[m], str)}
    assert problems == {}
    rejected = {m: sorted(shown_commands[m] - set(options[m])) for m in modules}
    assert {m: flags for m, flags in rejected.items() if flags} == {}


def test_a_parser_rejects_a_flag_it_does_not_declare(tmp_path):
    options = parser_options(["tools.report"], tmp_path)["tools.report"]
    assert {"--base", "--out"} <= set(options)
    assert "--nope" not in options


def test_every_make_target_shown_exists():
    targets = makefile_targets()
    assert {"pipeline", "test", "setup", "lock", "bench"} <= targets
    shown = {t for doc in DOCS for code in code_of(doc.read_text()) for t in MAKE.findall(code)}
    assert shown - targets == set()


def test_every_ci_script_shown_exists():
    shown = {s for doc in DOCS for s in CI_SCRIPT.findall(doc.read_text())}
    assert shown, "no .ci/ script found in the docs"
    assert sorted(s for s in shown if not (ROOT / ".ci" / s).exists()) == []


def test_every_params_key_named_exists():
    keys = params_keys()
    sections = sorted({k.split(".")[0] for k in keys})
    # Sample blocks are DVC's output, whose metric names (train.loss) are not params.
    prose = [docs_samples.BLOCK.sub("", doc.read_text()) for doc in DOCS]
    named = {k for text in prose for k in mentioned_params(text, sections)}
    assert "train.epochs" in named
    assert sorted(named - keys) == []


def test_params_keys_are_told_from_files_and_functions():
    text = (
        "`train.epochs` stages/train.py `train.py` train.train_model(x) "
        "`-S prepare.test_size=5` docs/export.md `python -m stages.export` train.nope."
    )
    assert mentioned_params(text, ["export", "prepare", "train"]) == {
        "train.epochs",
        "prepare.test_size",
        "train.nope",
    }


# --- the committed baseline's figures ------------------------------------------------------


def export_headline():
    """(classes that differ, max |Δp| vs float32 Keras, images compared) of the committed
    export, from data/export/metrics.json and, for the details, parity.json."""
    exported = ROOT / "data" / "export"
    metrics = json.loads((exported / "metrics.json").read_text())
    details = metrics if "parity" in metrics else json.loads((exported / "parity.json").read_text())
    formats = [details["parity"]["onnx"], details["parity"]["saved_model"]]
    differing = metrics.get("differing_classes", sum(f["differing_classes"] for f in formats))
    max_diff = metrics.get("max_abs_diff", max(f["max_abs_diff"] for f in formats))
    return differing, max_diff, details["parity"]["onnx"]["images"]


def results_row(text, name):
    rows = re.findall(rf"^\| {re.escape(name)} \| (.+) \|$", text, re.MULTILINE)
    assert len(rows) == 1, f"README.md needs one Results row '| {name} | ... |', found {len(rows)}"
    return rows[0]


def check_baseline_figures(text):
    """Raises AssertionError naming the first figure of README `text` that differs from
    the committed metrics files."""
    metrics = json.loads((ROOT / "data" / "evaluate" / "metrics.json").read_text())
    accuracy = f"{metrics['accuracy']:.2%}"
    stated = re.findall(r"(\d+\.\d+)%\** \((\d+) errors in 10,000\)", text)
    assert stated, "README.md states no 'NN.NN% (N errors in 10,000)'"
    for percent, errors in stated:
        assert (f"{percent}%", int(errors)) == (accuracy, metrics["errors"])
    row = results_row(text, "test accuracy")
    assert re.search(r"(\d+\.\d+)%", row).group(0) == accuracy

    loss = results_row(text, "test loss")
    decimals = len(loss.split(".")[1])
    assert float(loss) == round(metrics["loss"], decimals)

    differing, max_diff, images = export_headline()
    parity = results_row(text, "export parity")
    assert differing == 0 and "predict the class Keras predicts on all" in parity
    assert int(re.search(r"all ([\d,]+) test images", parity).group(1).replace(",", "")) == images
    stated_diff = re.search(r"max \\?\|Δp\\?\| ([\d.]+e-\d+)", parity).group(1)
    assert float(stated_diff) == float(f"{max_diff:.1e}")


def test_the_readme_states_the_committed_baseline():
    check_baseline_figures(README.read_text())


@pytest.mark.parametrize(
    "old, new",
    [
        ("90 errors", "91 errors"),
        ("| 0.0336 |", "| 0.0337 |"),
        ("2.4e-6", "2.5e-6"),
        ("**99.10%**", "**99.12%**"),
    ],
)
def test_a_wrong_baseline_figure_fails(old, new):
    text = README.read_text()
    assert old in text
    with pytest.raises(AssertionError):
        check_baseline_figures(text.replace(old, new))


# --- regenerated samples ------------------------------------------------------------------


def test_every_sample_block_names_a_sample_and_holds_real_output():
    for doc in DOCS:
        text = doc.read_text()
        for match in docs_samples.BLOCK.finditer(text):
            name, body = match.group(2), match.group(3)
            assert name in docs_samples.SAMPLES, f"{doc.name}: unknown sample '{name}'"
            assert body.startswith("```\n$ "), (
                f"{doc.name}: sample '{name}' is not regenerated output"
            )
        assert len(docs_samples.OPENING.findall(text)) == len(docs_samples.BLOCK.findall(text))


def test_replace_samples_rewrites_only_the_marked_blocks():
    text = (
        "intro `<!-- sample: quoted -->`\n"
        "<!-- sample: a -->\n```\nold a\n```\n<!-- /sample -->\nmiddle\n"
        "<!-- sample: b -->\n<!-- /sample -->\nend\n<!-- sample: a -->\nstale\n<!-- /sample -->\n"
    )
    samples = {"a": "$ dvc status\nup to date\n\n", "b": "$ ls"}
    assert docs_samples.replace_samples(text, samples) == (
        "intro `<!-- sample: quoted -->`\n"
        "<!-- sample: a -->\n```\n$ dvc status\nup to date\n```\n<!-- /sample -->\n"
        "middle\n<!-- sample: b -->\n```\n$ ls\n```\n<!-- /sample -->\n"
        "end\n<!-- sample: a -->\n```\n$ dvc status\nup to date\n```\n<!-- /sample -->\n"
    )
    assert docs_samples.replace_samples("no markers\n", samples) == "no markers\n"
    assert docs_samples.replace_samples(
        "<!-- sample: b -->\nold\n<!-- /sample -->\n", samples, "<sub>x</sub>"
    ) == ("<!-- sample: b -->\n```\n$ ls\n```\n<sub>x</sub>\n<!-- /sample -->\n")


def test_replace_samples_refuses_an_unknown_name_or_an_unclosed_marker():
    with pytest.raises(PipelineError) as e:
        docs_samples.replace_samples("<!-- sample: c -->\n<!-- /sample -->\n", {"a": "", "b": ""})
    assert str(e.value) == "no sample named 'c' (known: a, b)"
    unclosed = "<!-- sample: a -->\nx\n<!-- sample: b -->\ny\n<!-- /sample -->\n"
    with pytest.raises(PipelineError) as e:
        docs_samples.replace_samples(unclosed, {"a": "", "b": ""})
    assert str(e.value) == "sample 'a' has no closing <!-- /sample --> marker"


def test_set_params_edits_one_key_of_one_section_and_keeps_its_comment(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "prepare:\n  epochs: 3  # not train's\ntrain:\n  model: reference  # preset\n"
        "  epochs: null           # the preset's\n"
    )
    set_params(params, {"train.epochs": 15})
    assert params.read_text() == (
        "prepare:\n  epochs: 3  # not train's\ntrain:\n  model: reference  # preset\n"
        "  epochs: 15             # the preset's\n"  # the comment keeps its column
    )
    with pytest.raises(PipelineError) as e:
        set_params(params, {"train.seed": 1})
    assert str(e.value) == f"{params}: no key train.seed"


def test_set_params_writes_floats_that_pyyaml_reads_as_floats(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("export:\n  tolerance: 1.0e-4  # max\n  batch_size: 1000\n")
    set_params(params, {"export.tolerance": 1e-9, "export.batch_size": 500})
    assert yaml.safe_load(params.read_text()) == {"export": {"tolerance": 1e-9, "batch_size": 500}}


def test_the_readme_stays_short_and_the_benchmarks_page_a_reference():
    assert len(README.read_text().splitlines()) < 220
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 250
