"""The documentation cannot rot: the configuration reference is generated, and the command
blocks of README.md and docs/*.md that are marked runnable are run.

A marker is an HTML comment on the line right before a ```bash fence:

- ``<!-- runnable -->``: every line is a ``chattune`` command, run in order through
  ``chattune.cli.main`` in one temporary directory per file (a later block may use the run
  an earlier one wrote). It runs as written except that it is made cheap: the model is a
  tiny random Llama (``--model``, ``--tokenizer``), rows are at most 128 tokens in
  micro-batches of 2, step and token budgets are divided by 50, and eval and chat answer
  2 prompts with 16 new tokens. Each command must exit 0. ``serve``, ``compare`` and
  ``demo`` do not fit in seconds: mark those blocks ``check``.
- ``<!-- runnable: check -->``: for blocks that need real data, a long run or a server.
  Every ``chattune`` command (also ``accelerate launch ... -m chattune.cli ...``) must
  parse with the CLI's own parser, and a ``train`` command's config must build (so every
  flag and ``--set`` key exists); other lines (curl, vllm, benchmarks) are not checked.
- ``<!-- not runnable: REASON -->``: said on purpose.

In docs/, every ```bash block carries one of the three; README.md's marked blocks run too.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from chattune import config_reference
from chattune.config import field
from tiny import make_model, make_tokenizer

REPO = Path(__file__).parents[1]
PAGES = sorted((REPO / "docs").glob("*.md"))
MARKER = re.compile(r"^<!-- (runnable|runnable: check|not runnable: .+) -->$")
NOT_IN_SECONDS = {"serve", "compare", "demo"}


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the fence
    mode: str  # "run", "check", "skip" or "" (unmarked)
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The ```bash blocks of a Markdown file, with the marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh"):
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            mode = "" if not marker else {"runnable": "run", "runnable: check": "check"}.get(marker[1], "skip")
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            out.append(Block(path, i + 1, mode, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return out


def commands(text: str) -> list[list[str]]:
    """Shell lines as argument lists: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def chattune_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``chattune`` (or ``-m chattune.cli``), or None for another program."""
    if Path(argv[0]).name == "chattune":
        return argv[1:]
    if "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] == ["chattune.cli"]:
        return argv[argv.index("-m") + 2:]
    return None


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``flag value`` replaces every value the command gave for ``flag``, or is appended."""
    if flag not in argv:
        return [*argv, flag, value]
    return [value if i and argv[i - 1] == flag else a for i, a in enumerate(argv)]


def _scale(argv: list[str], flag: str) -> list[str]:
    return [str(math.ceil(int(a) / 50)) if i and argv[i - 1] == flag else a for i, a in enumerate(argv)]


def cheap(argv: list[str], tiny: Path) -> list[str]:
    """The command as written, on the tiny model and small budgets (see the module docstring)."""
    cmd = argv[0]
    if cmd == "train":
        if "--resume" not in argv:
            argv = _set(argv, "--model", str(tiny))
        argv = _set(_set(argv, "--max-length", "128"), "--batch-size", "2")
        argv = _scale(_scale(argv, "--max-steps"), "--max-tokens")
    elif cmd == "eval":
        for flag, value in [("--num-prompts", "2"), ("--max-new-tokens", "16"), ("--max-samples", "4"),
                            ("--max-batch", "8")]:
            argv = _set(argv, flag, value)
    elif cmd == "chat":
        argv = _set(argv, "--max-new-tokens", "16")
    elif cmd == "methods" or (cmd == "data" and "--model" in argv):
        argv = _set(argv, "--model", str(tiny))
    elif cmd == "data" and "--tokenizer" in argv:
        argv = _set(argv, "--tokenizer", str(tiny))
    return argv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama with room for the default 1,024-token rows plus virtual tokens."""
    path = tmp_path_factory.mktemp("docs-model") / "tiny-llama"
    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    model.config.max_position_embeddings = 2048
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def run_block(block: Block, tiny: Path) -> None:
    from chattune.cli import main

    for argv in commands(block.text):
        args = chattune_argv(argv)
        if args is None or not args:
            pytest.fail(f"{block.where()}: a runnable block holds chattune commands only, not: {shlex.join(argv)}")
        if args[0] in NOT_IN_SECONDS:
            pytest.fail(f"{block.where()}: `chattune {args[0]}` does not finish in seconds; mark it "
                        "<!-- runnable: check -->")
        sys.stdin = io.StringIO("Hello!\n")  # chat without --prompt reads turns until EOF
        try:
            rc = main(cheap(args, tiny))
        except SystemExit as e:  # argparse: an unknown flag or a bad value
            rc = e.code
        assert rc == 0, f"{block.where()}: `{shlex.join(argv)}` exited {rc}"


def check_block(block: Block) -> None:
    from chattune.cli import build_parser

    for argv in commands(block.text):
        args = chattune_argv(argv)
        if not args:
            continue
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{block.where()}: the CLI does not accept `{shlex.join(argv)}` (see stderr)")
        if args[0] == "train" and not parsed.resume:
            from chattune.training.settings import FLAG_KEYS, build_config

            build_config(parsed.config, {k: getattr(parsed, k, None) for k in FLAG_KEYS}, parsed.set)


def files_with_marked_blocks() -> list[Path]:
    return [p for p in [REPO / "README.md", *PAGES] if p.is_file() and any(b.mode for b in blocks(p))]


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine they wait on each other
    (one thread ran the tiny training steps 3x faster under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", files_with_marked_blocks(), ids=lambda p: str(p.relative_to(REPO)))
def test_marked_blocks_run(path, tiny, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the repository's configs, as from its root
    monkeypatch.setattr(sys, "stdin", sys.stdin)  # restored after the chat commands replace it
    for block in blocks(path):
        if block.mode == "run":
            run_block(block, tiny)
    monkeypatch.chdir(REPO)  # check blocks name the repository's files (configs/seed.yaml)
    for block in blocks(path):
        if block.mode == "check":
            check_block(block)


def test_every_docs_block_is_marked():
    unmarked = [b.where() for p in PAGES for b in blocks(p) if not b.mode]
    assert PAGES and not unmarked, f"```bash blocks without a runnable marker: {unmarked}"


def test_extraction_joins_continuations_and_drops_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- runnable -->\n```bash\nchattune train \\\n    --max-steps 200   # comment\n"
                    "# a comment line\n\nchattune eval runs/run\n```\n```bash\nmake demo\n```\n")
    found = blocks(page)
    assert [b.mode for b in found] == ["run", ""]
    assert commands(found[0].text) == [["chattune", "train", "--max-steps", "200"], ["chattune", "eval", "runs/run"]]
    assert cheap(["train", "--max-steps", "200", "--model", "smollm2-135m"], Path("/t"))[:5] == \
        ["train", "--max-steps", "4", "--model", "/t"]


def test_check_mode_catches_an_unknown_flag_and_config_key(tmp_path):
    for text in ("chattune train --max-stepz 3", "chattune train --set train.lrr=1"):
        with pytest.raises((pytest.fail.Exception, Exception), match="does not accept|unknown config key"):
            check_block(Block(REPO / "README.md", 1, "check", text))


def test_run_mode_refuses_other_programs_and_fails_on_a_bad_command(tiny):
    for text, message in [("make demo", "chattune commands only"), ("chattune serve runs/run", "runnable: check"),
                          ("chattune train --max-stepz 3", "exited 2")]:
        with pytest.raises(pytest.fail.Exception if "exited" not in message else AssertionError, match=message):
            run_block(Block(REPO / "README.md", 1, "run", text), tiny)


# -- the configuration reference ---------------------------------------------------------------
def test_every_config_key_has_help():
    assert config_reference.missing_help() == []


def test_a_key_without_help_is_reported(monkeypatch):
    @dataclasses.dataclass
    class Loose:
        documented: int = field(1, help="has help")
        bare: int = dataclasses.field(default=2)

    keys = config_reference.keys_of(Loose, "loose")
    monkeypatch.setattr(config_reference, "sections", lambda: [config_reference.Section("loose", "a section", keys)])
    assert config_reference.missing_help() == ["loose.bare"]


def test_configuration_page_is_what_the_generator_writes():
    page = REPO / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == config_reference.render(), \
        "docs/configuration.md is out of date: run `python -m chattune.config_reference`"


def test_reference_lists_every_method_and_key():
    from chattune.methods import all_methods
    from chattune.training.settings import RunConfig

    text = config_reference.render()
    for name in all_methods():
        assert f"## `method.{name}`" in text
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            if section.name != "method" or f.name == "name":
                assert f"`{section.name}.{f.name}`" in text


# -- links ---------------------------------------------------------------------------------------
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]+)?\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.startswith("#")]
    return {"#" + re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            dest = (page.parent / target).resolve()
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target}{anchor}")
    assert not broken, f"broken links: {broken}"
