"""The docs cannot drift from the code: every Python block of README.md and docs/*.md runs
(and of BUILD.md and benchmarks/README.md, should they get one).

Blocks of one file run in order, in one namespace (a guide builds its example up), in a fresh
working directory; a "/tmp/..." path in a block is redirected under pytest's `tmp_path`, so
no two runs share a model_dir. A block not meant to run is fenced as `sh` or `text`, never
left without a language. The cheap checks beside it: every `--flag` the docs name is a flag
of the program it belongs to, every `--trainer=module:Class` they run exists, every relative
link and `#anchor` leads somewhere, every `tapekit.name` resolves, every repository path in
backticks exists, and BUILD.md's architecture table names every module of tapekit/.
"""

import glob
import importlib
import os
import re

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = ["README.md", *sorted(os.path.relpath(path, REPO)
                               for path in glob.glob(os.path.join(REPO, "docs", "*.md")))]
# Besides the guides, the pages whose links, names and paths are checked.
PAGES = [*GUIDES, "BUILD.md", "benchmarks/README.md"]
LANGUAGES = ("python", "sh", "text")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as stream:
        return stream.read()


def fenced_blocks(text: str):
    """(language, line number of the block's first line, code) for each fenced block."""
    for match in FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(2)) + 1
        yield match.group(1).strip(), first_line, match.group(2)


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def test_the_guides_are_there_and_the_readme_stays_short():
    assert len(GUIDES) >= 7, GUIDES  # README.md, docs/README.md and the six task guides
    lines = read("README.md").count("\n")
    assert lines <= 150, f"README.md has {lines} lines; move the detail into docs/"


@pytest.mark.parametrize("page", PAGES)
def test_every_block_says_its_language(page):
    for language, line, _ in fenced_blocks(read(page)):
        assert language in LANGUAGES, (
            f"{page}:{line}: a block fenced as {language!r}; use python (it runs in "
            f"tests/test_docs.py), sh or text")


@pytest.mark.parametrize("page", [page for page in PAGES
                                  if any(language == "python"
                                         for language, _, _ in fenced_blocks(read(page)))])
def test_the_python_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONBREAKPOINT", "0")  # a breakpoint() in a block never stops a run
    namespace = {"__name__": "__docs__"}
    for language, line, code in fenced_blocks(read(page)):
        if language != "python":
            continue
        code = code.replace('"/tmp/', f'"{tmp_path}/').replace("'/tmp/", f"'{tmp_path}/")
        # Padded so that a traceback names the Markdown file's own line.
        block = compile("\n" * (line - 1) + code, os.path.join(REPO, page), "exec")
        exec(block, namespace)  # noqa: S102 (running the docs' own code is the point)


# ------------------------------------------------------------------ flags

def _defined_in_source(pattern: str, paths) -> set:
    found = set()
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            found.update(re.findall(pattern, stream.read()))
    return found


def tapekit_train_flags() -> set:
    """Every flag `tapekit-train` knows: the common ones, absl's own, and the own flags of
    the built-in and example trainers (declared in their `define_flags`)."""
    from tapekit import cli
    common = flags.FlagValues()
    cli.define_common_flags(common)
    absl_own = {name for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
                if module.startswith("absl") for flag in module_flags
                for name in (flag.name, flag.short_name) if name}
    trainers = glob.glob(os.path.join(REPO, "trainers", "*.py"))
    examples = glob.glob(os.path.join(REPO, "examples", "*.py"))
    own = _defined_in_source(r'DEFINE_\w+\(\s*"(\w+)"', trainers + examples)
    return set(common) | absl_own | own | {"helpfull", "helpshort", "help", "flagfile"}


def other_programs_flags() -> dict:
    """The flags of the other programs the docs run, by program."""
    return {
        "tapekit-data": _defined_in_source(
            r'DEFINE_\w+\(\s*"(\w+)"', [os.path.join(REPO, "tapekit", "input", "tfrecords.py")]),
        "benchmarks/*.py": _defined_in_source(
            r'add_argument\(\s*"--(\w+)"', glob.glob(os.path.join(REPO, "benchmarks", "*.py"))),
        "tensorboard": {"logdir"},
        "sbatch": {"nodes", "ntasks-per-node", "gpus-per-node", "requeue"},
        "pip": {"no-deps", "no-build-isolation", "quiet", "upgrade"},
    }


def test_every_flag_the_docs_name_exists():
    train = tapekit_train_flags()
    assert {"model_dir", "train_steps", "strategy", "mode", "pdb_post_mortem",
            "real_mean"} <= train
    others = other_programs_flags()
    known = train.union(*others.values())
    unknown = []
    for page in PAGES:
        text = read(page)
        for match in re.finditer(r"(?<![\w-])--([a-z][a-z0-9_-]*[a-z0-9_])", text):
            name = match.group(1)
            if name not in known and not (name.startswith("no") and name[2:] in train):
                line = text.count("\n", 0, match.start()) + 1
                unknown.append(f"{page}:{line}: --{name}")
    assert not unknown, "flags named in the docs that no program defines:\n" + "\n".join(unknown)


def test_every_trainer_the_docs_run_exists(monkeypatch):
    monkeypatch.syspath_prepend(REPO)  # examples/ is imported from the repository root
    from tapekit.trainers.main import BUILTIN_TRAINERS
    missing = []
    for page in PAGES:
        for spec in set(re.findall(r"--trainer=([\w.:]+)", read(page))):
            if spec in BUILTIN_TRAINERS or spec.startswith("my_"):  # my_*: the reader's own
                continue
            module, _, name = spec.partition(":")
            try:
                getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as error:
                missing.append(f"{page}: --trainer={spec} ({error})")
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------------ links, names and paths

def test_the_architecture_in_build_md_names_every_module():
    """Each module of tapekit/ is named in its folder's row of BUILD.md's table, and each
    module a row names is there."""
    rows = {match.group(1): match.group(0) for match in re.finditer(
        r"^\| `(tapekit/(?:\w+/|\*\.py))` \|.*$", read("BUILD.md"), re.MULTILINE)}
    gone = [f"{folder}{name}" for folder, row in rows.items()
            for name in re.findall(r"`(\w+\.py)`", row)
            if not os.path.exists(os.path.join(REPO, folder.replace("*.py", ""), name))]
    assert not gone, f"BUILD.md's architecture table names modules that are not there: {gone}"
    unnamed = []
    for path in sorted(glob.glob(os.path.join(REPO, "tapekit", "**", "*.py"), recursive=True)):
        relative = os.path.relpath(path, REPO)
        folder, name = os.path.split(relative)
        if name == "__init__.py":
            continue
        row = rows.get(folder + "/" if folder != "tapekit" else "tapekit/*.py", "")
        if f"`{name}`" not in row:
            unnamed.append(relative)
    assert not unnamed, f"BUILD.md's architecture table does not name: {', '.join(unnamed)}"


def heading_anchors(text: str) -> set:
    """GitHub's anchors for the page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", prose(text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_leads_somewhere(page):
    text = read(page)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO, linked)):
            broken.append(f"{target}: no {linked}")
        elif anchor and linked.endswith(".md") and anchor not in heading_anchors(read(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked}")
    assert not broken, f"{page}: " + "; ".join(broken)


def resolves(dotted: str) -> bool:
    """Whether `tapekit.a.b` names a module, or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(value, name):
                return False
            value = getattr(value, name)
        return True
    return False


@pytest.mark.parametrize("page", PAGES)
def test_every_tapekit_name_and_repository_path_exists(page):
    text = read(page)
    missing = []
    for code in re.findall(r"`([^`\n]+)`", prose(text)):
        for dotted in re.findall(r"(?<![\w/.])tapekit(?:\.\w+)+", code):
            if not resolves(dotted):
                missing.append(dotted)
        path = re.fullmatch(r"((?:tapekit|models|trainers|examples|benchmarks|tests|docs)/"
                            r"[\w./-]*)(?:::\S*)?", code)
        if path and not glob.glob(os.path.join(REPO, path.group(1))):
            missing.append(path.group(1))
    assert not missing, f"{page} names what does not exist: {', '.join(sorted(set(missing)))}"
