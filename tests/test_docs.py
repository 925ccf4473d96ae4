"""README.md, docs/*.md and the Chinese quick start against the code: settings, defaults, quoted messages,
commands, the printed log format, links, names, the install files and README's size and opening."""

import ast
import functools
import glob
import heapq
import os
import re
import shlex

import pytest

import babygpt
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
QUICKSTART = os.path.join(ROOT, "docs", "quickstart.zh.md")
PAGES = [README] + DOCS
README_LIMIT = 12_000
ELL = "…"  # the docs' mark for text left out
COVERAGE = 0.5  # the share of a quote that a message's fixed text must match (the rest: its fields)
OWN_TEXT = 8  # characters (fewer in a short quote) that a message's own text must match, not one in its field


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, ROOT)


# -----------------------------------------------------------------------------
# Reading the pages: fenced blocks, inline code, tables

FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # also indented, in a list


def code_blocks(text):
    return [m[1] for m in FENCE.finditer(text)]


def inline_code(text):
    """The `inline code` spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def code_pieces(text):
    """Every line of every fenced block, and every inline code span: where commands and quotes live."""
    return [line for block in code_blocks(text) for line in block.splitlines()] + inline_code(text)


def table_rows(text, header):
    """The rows (lists of cells) of the table whose header row starts with `header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip("|"))])
    return rows


def ticks(cell):
    return re.findall(r"`([^`]+)`", cell)


# -----------------------------------------------------------------------------
# babygpt.py's messages: every string expression of its source, f-string fields as wildcards

VALUE, LIST, ANY = "\x00", "\x01", "\x02"  # a field: a short value (or a short message), a list, anything


def templates(node):
    """The texts a string expression can produce, each field replaced by a wildcard."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [re.sub(r"\{[a-z_]+\}", VALUE, node.value)]  # "... {folder} ...".format(folder=...)
    if isinstance(node, ast.JoinedStr):
        out = [""]
        for part in node.values:
            options = (templates(part) if isinstance(part, ast.Constant) else
                       templates(part.value) if isinstance(part.value, ast.IfExp) else [field(part.value)])
            out = [a + b for a in out for b in options][:64]
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a in templates(node.left) for b in templates(node.right)][:64]
    if isinstance(node, ast.IfExp):
        return templates(node.body) + templates(node.orelse)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "chr"
            and isinstance(node.args[0], ast.Constant)):
        return [chr(node.args[0].value)]  # chr(10): a newline
    return [field(node)]


def field(node):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join":
        return LIST
    if isinstance(node, (ast.Call, ast.IfExp, ast.BoolOp)):
        return ANY
    return VALUE


@functools.lru_cache(maxsize=1)
def source_templates():
    tree = ast.parse(read(os.path.join(ROOT, "babygpt.py")))
    parts = {id(child) for node in ast.walk(tree) if isinstance(node, (ast.JoinedStr, ast.BinOp, ast.IfExp))
             for child in ast.iter_child_nodes(node)}  # pieces of a longer message are not messages
    found = set()
    for node in ast.walk(tree):
        if id(node) not in parts and (isinstance(node, (ast.JoinedStr, ast.BinOp, ast.IfExp)) or (
                isinstance(node, ast.Constant) and isinstance(node.value, str))):
            found.update(t.strip("\n") for t in templates(node) if len(literal(t)) >= 2)
    # a message that starts with fixed text and leaves little open ("at least 1", "at step {it}; ...") can
    # fill another's field; indexed by its first character
    short = {}
    for t in found:
        if len(head(t)) >= 2 and len(literal(t)) >= max(12 if ANY in t else 6, len(t) / 2):
            short.setdefault(t[0], []).append(t)
    return sorted(found), short


def head(template):
    """The fixed text a template starts with."""
    return re.match(r"[^\x00\x01\x02]*", template)[0]


heads = functools.lru_cache(maxsize=None)(head)


def literal(template):
    return re.sub("[\x00\x01\x02]", "", template)


def template_ends(quote, qi, template, short=None, memo=None, credit=1):
    """({quote position where `template` can end, matched from qi: the most quote characters matched by its
    fixed text}, the most matched when the quote ends inside it, or -1). `…` in the quote stands for any text
    of the template; a value field takes a word (or, with `short`, a short message of the source), a list
    field a list, an "any" field anything."""
    best, heap, ends, exhausted = {(qi, 0): 0}, [(qi, qi, 0)], {}, -1
    while heap:  # every move advances in the quote or the template: visit states in that order
        _, qi, ti = heapq.heappop(heap)
        score = best[(qi, ti)]

        def move(q2, t2, gain=0):
            if best.get((q2, t2), -1) < score + gain:
                if (q2, t2) not in best:
                    heapq.heappush(heap, (q2 + t2, q2, t2))
                best[(q2, t2)] = score + gain

        if ti == len(template):
            ends[qi] = max(ends.get(qi, -1), score)
        if qi == len(quote):
            exhausted = max(exhausted, score)
            if ti < len(template) and template[ti] in (ANY, LIST, VALUE):  # a field left empty at the end
                move(qi, ti + 1)
            continue
        q = quote[qi]
        if q == ELL:
            move(qi + 1, ti)
            if ti < len(template):
                move(qi, ti + 1)
            continue
        if ti == len(template):
            continue
        t = template[ti]
        if t in (ANY, LIST, VALUE):
            move(qi, ti + 1)
            if t == ANY or (t == LIST and q != ";") or (t == VALUE and not q.isspace()):
                move(qi + 1, ti)
            if t != LIST and short is not None:  # a message of its own in the field: "must be {rule}"
                if qi not in memo:
                    inner, inner_exhausted = {}, -1
                    for s in short.get(q, []):
                        fixed = heads(s)
                        if ELL in quote[qi:qi + len(fixed)] or quote.startswith(fixed[:len(quote) - qi], qi):
                            ends_s, exhausted_s = template_ends(quote, qi, s)
                            for e, n in ends_s.items():
                                if e > qi and n > inner.get(e, -1):
                                    inner[e] = n
                            inner_exhausted = max(inner_exhausted, exhausted_s)
                    memo[qi] = inner, inner_exhausted
                inner, inner_exhausted = memo[qi]
                for e, n in inner.items():
                    move(e, ti + 1, n * credit)
                exhausted = max(exhausted, score + credit * inner_exhausted if inner_exhausted >= 0 else -1)
        elif q == t:
            move(qi + 1, ti + 1, 1)
    return ends, exhausted


def printed_by_babygpt(quote, fragment=False):
    """Whether babygpt.py prints the quote (with `fragment`, the start of a line it prints): the quote matches
    a message of the source, and the message's fixed text covers most of the quote, not its fields."""
    found, short = source_templates()
    candidates = [quote] + [quote[len(p):] for p in ("error: ", "warning: ", "ValueError: ") if quote.startswith(p)]
    # a command at the end is built by code, not written in a string; the command checks below read it
    candidates += [re.sub(r"(?:python|torchrun) \S*babygpt\.py.*", ELL, q) for q in candidates if "babygpt.py" in q]
    for q in candidates:
        memo, need = {}, COVERAGE * len(q.replace(ELL, ""))
        for t in found:
            fixed = heads(t)
            if ELL not in q[:len(fixed)] and not q.startswith(fixed[:len(q)]):
                continue
            if matched(q, t, short, memo, need, fragment):
                # and the message's own text, not only one in its field (a path, a rule), matches enough
                if matched(q, t, short, memo, min(OWN_TEXT, 0.8 * need), fragment, credit=0):
                    return True
    return False


def matched(quote, template, short, memo, need, fragment, credit=1):
    ends, exhausted = template_ends(quote, 0, template, short, memo, credit)
    return ends.get(len(quote), -1) >= need or (fragment and exhausted >= need)


MESSAGE_START = ("step ", "total ", "模型已保存", "dtype auto", "preset ", "override:", "wandb:",
                 "max_minutes:", "to repeat", "interrupted", "note:", "warning:", "error:", "stopping",
                 "resuming", "sampling from", "… steps fit")


def quoted_output(path):
    """The lines a page shows as babygpt's output: in code, starting as babygpt's messages do."""
    return [p.strip() for p in code_pieces(read(path)) if p.strip().startswith(MESSAGE_START)]


def troubleshooting_quotes():
    """The messages docs/troubleshooting.md quotes in its "babygpt prints" column."""
    rows = table_rows(read(os.path.join(ROOT, "docs", "troubleshooting.md")), "| Problem")
    quotes = [q for row in rows for q in ticks(row[1])]
    return [q for q in quotes if " " in q]  # a single word is a name (`sample`), not a message


def test_messages_troubleshooting_quotes_are_printed_by_babygpt():
    """A user who looks up the line on their screen finds it in docs/troubleshooting.md, worded as printed."""
    quotes = troubleshooting_quotes()
    assert len(quotes) > 60, "the table was not found or lost its quotes"
    missing = [q for q in quotes if not printed_by_babygpt(q)]
    assert not missing, "docs/troubleshooting.md quotes messages babygpt.py does not print:\n" + "\n".join(missing)


def test_messages_every_quoted_output_line_is_printed_by_babygpt():
    """Every output line README and docs show (log lines, notes, the phase line) is one the code prints."""
    lines = [(rel(p), line) for p in PAGES for line in quoted_output(p)]
    assert len(lines) > 20
    missing = [f"{page}: {line}" for page, line in lines
               if not (phase_line(line) if line.startswith("total ") else printed_by_babygpt(line, fragment=True))]
    assert not missing, "lines shown as output that babygpt.py does not print:\n" + "\n".join(missing)


def phase_line(line):
    """Whether the line is the phase line as printed: its total, then each phase of PhaseClock.PHASES in order."""
    m = re.fullmatch(r"total (?:\d+\.\d|…)s: (.*)", line)
    parts = [re.fullmatch(r"(.+) (?:\d+\.\d|…)s", p) for p in m[1].split(", ")] if m else [None]
    return all(parts) and [p[1] for p in parts] == list(babygpt.PhaseClock.PHASES)


def test_messages_the_matcher_refuses_changed_wording():
    """The message checks above would pass any text if the matcher accepted everything."""
    assert printed_by_babygpt("data file X does not exist; …")
    assert not printed_by_babygpt("data file X is missing; …")
    assert not printed_by_babygpt("n_layer must be at most 1 (got 0)")
    assert printed_by_babygpt("n_layer must be at least 1 (got 0)")
    assert printed_by_babygpt("模型已保存到model.pth", fragment=True)
    assert not printed_by_babygpt("模型已保存至model.pth", fragment=True)  # a path in a field is not enough


# -----------------------------------------------------------------------------
# Settings: every --name=value is a real setting with a valid value; quoted defaults are the defaults

PLACEHOLDER = re.compile(r"^(?:[A-Z]+|value|….*|.*…)$")  # --max_iters=N, --data_path=FILE, --prompts=…
TOOLS = {"babygpt.py": "babygpt", "bench.py": "bench.py", "val_loss.py": "scripts/val_loss.py",
         "torchrun": "torchrun", "pip ": "other", "npm ": "other", "wandb ": "other", "git ": "other"}
SCRIPTS = ("babygpt", "bench.py", "scripts/val_loss.py")


def torchrun_flags():
    """The options torchrun itself accepts, read from its own argument parser."""
    from torch.distributed.run import get_args_parser
    return {s.lstrip("-").replace("-", "_") for a in get_args_parser()._actions for s in a.option_strings}


TORCHRUN_FLAGS = torchrun_flags()


def flags(text):
    """(tool, name, value or None) of every --flag. The tool is the command the flag follows in its line or
    code span, else the script a prose paragraph last named, else babygpt."""
    out = []
    pieces = [(line, "") for block in code_blocks(text) for line in block.splitlines()]
    for paragraph in re.split(r"\n\s*\n|\n(?=\|)", FENCE.sub("", text)):  # a table row is a paragraph
        for m in re.finditer(r"`([^`\n]+)`|([^`]+)", paragraph):
            pieces.append((m[0], paragraph[:m.start()]))
    for piece, before_piece in pieces:
        for m in re.finditer(r"(?<![\w-])--([A-Za-z_][\w-]*)(?:=([^\s`)]*))?", piece):
            before = piece[:m.start()]
            marks = [(before.rfind(mark), tool) for mark, tool in TOOLS.items() if mark in before]
            if not marks:  # "`python bench.py` ... `--only=fast`": the paragraph's script
                marks = [(before_piece.rfind(mark), tool) for mark, tool in TOOLS.items()
                         if mark in before_piece and tool in SCRIPTS]
            tool = max(marks)[1] if marks else "babygpt"
            value = None if m[2] is None else m[2].rstrip(".,;:")
            out.append((tool, m[1], value))
    return out


def setting_problem(name, value):
    """Why --name=value is not a valid babygpt setting, or None."""
    if name in ("help", "name"):  # --help; "--name=value" is how the docs spell the form
        return None
    name = "train_data_ratio" if name == "tain_data_ratio" else name  # the seed's spelling works
    if name not in babygpt.CONFIG_KEYS:
        return f"--{name} is not a setting"
    if value is None or PLACEHOLDER.match(value):
        return None
    for v in value.split("|"):  # --compile=true|false: either
        try:
            parsed = babygpt.parse_value(name, v, getattr(babygpt, name))
        except babygpt.UserError as e:
            return str(e)
        if name in babygpt.CHOICES and str(parsed).lower() not in babygpt.CHOICES[name]:
            return f"--{name}={v}: not one of {babygpt.CHOICES[name]}"
        if name == "preset" and parsed not in ("", *babygpt.PRESETS):
            return f"--preset={v}: no such preset"
    return None


def test_settings_every_flag_in_the_docs_is_a_real_setting():
    """A user who copies a --name=value from README, docs or the Chinese page gets that setting, not an error."""
    # the "babygpt prints" column quotes messages, some about wrong settings on purpose (--foo)
    trouble = os.path.join(ROOT, "docs", "troubleshooting.md")
    quoted = set(troubleshooting_quotes())
    problems, seen = [], 0
    for path in PAGES:
        text = read(path)
        if path == trouble:
            text = re.sub(r"`([^`\n]+)`", lambda m: "" if m[1] in quoted else m[0], text)
        for tool, name, value in flags(text):
            seen += 1
            if tool == "babygpt":
                why = setting_problem(name, value)
            elif tool in ("bench.py", "scripts/val_loss.py"):
                why = None if f'"--{name}"' in read(os.path.join(ROOT, tool)) else f"{tool} has no --{name}"
            elif tool == "torchrun":
                why = None if name in TORCHRUN_FLAGS else f"torchrun --{name}?"
            else:
                why = None
            if why:
                problems.append(f"{rel(path)}: --{name}{'' if value is None else '=' + value}: {why}")
    assert seen > 80
    assert not problems, "\n".join(problems)


def test_settings_the_quick_start_is_held_to_the_same_checks():
    """The Chinese page's flags are checked like the others: it is a page the checks read."""
    assert QUICKSTART in PAGES
    assert len(flags(read(QUICKSTART))) >= 8


def test_settings_readme_table_defaults_are_the_defaults():
    """README's settings table tells the defaults a run really uses."""
    rows = table_rows(read(README), "| setting | default |")
    checked = 0
    for row in rows:
        names, defaults = ticks(row[0]), ticks(row[1])
        if len(names) != len(defaults):
            continue  # --preset=cpu | (none)
        for name, default in zip(names, defaults):
            name = name.lstrip("-")
            value = getattr(babygpt, name)
            assert babygpt.parse_value(name, default, value) == value, f"README says --{name} defaults to {default}"
            checked += 1
    assert checked >= 15


def test_settings_cpu_preset_table_is_the_preset():
    """docs/cpu.md's table says what --preset=cpu sets and what the default is, as the code has them."""
    rows = table_rows(read(os.path.join(ROOT, "docs", "cpu.md")), "| setting | preset | default |")
    preset, checked = babygpt.PRESETS["cpu"], set()
    for row in rows:
        names = ticks(row[0])
        for name, p, d in zip(names, row[1].split(", "), row[2].split(", "), strict=True):
            default = getattr(babygpt, name)
            assert babygpt.parse_value(name, d, default) == default, f"cpu.md: default {name}={d}"
            assert babygpt.parse_value(name, p, default) == preset.get(name, default), f"cpu.md: preset {name}={p}"
            checked.add(name)
    assert set(preset) <= checked, f"cpu.md's table leaves out {set(preset) - checked}"


def test_settings_the_seeds_configuration_as_described():
    """README and the Chinese page describe the default run's size as the constants have it."""
    b = babygpt
    readme = re.search(r"([\d,]+) steps of batch (\d+) x (\d+) characters, a\s+(\d+)-layer, (\d+)-head, "
                       r"(\d+)-wide model, evaluated every (\d+) steps", read(README))
    zh = re.search(r"(\d+) 层、(\d+) 个注意力头、宽 (\d+) 的模型，批大小 (\d+) x (\d+) 个字，共 ([\d,]+) 步，\s*每 (\d+) 步",
                   read(QUICKSTART))
    assert readme and zh
    as_int = lambda groups: [int(g.replace(",", "")) for g in groups]
    assert as_int(readme.groups()) == [b.max_iters, b.batch_size, b.block_size, b.n_layer, b.n_head, b.n_embed,
                                       b.eval_interval]
    assert as_int(zh.groups()) == [b.n_layer, b.n_head, b.n_embed, b.batch_size, b.block_size, b.max_iters,
                                   b.eval_interval]


def test_settings_the_auto_margin_as_quoted():
    """The docs' rule for dtype=auto (at least 1.2x as fast) is the margin the code applies."""
    margin = f"{babygpt.AUTO_MARGIN}x"
    for path in (README, os.path.join(ROOT, "docs", "cpu.md")):
        said = set(re.findall(r"at least (?:\*\*)?(\d+(?:\.\d+)?x) as fast", read(path)))
        assert said == {margin}, f"{rel(path)} says {said}, the code {margin}"


# -----------------------------------------------------------------------------
# Commands: every babygpt command shown parses and validates, without training

def commands(path):
    """The arguments of every `python babygpt.py ...` or `torchrun ... babygpt.py ...` shown, without placeholders."""
    out = []
    for piece in code_pieces(read(path)):
        m = re.search(r"(?:python|torchrun[^`#]*?) babygpt\.py\b([^#]*)", piece)
        if m and ELL not in m[1] and "--help" not in m[1] and not re.search(r"=(?:N|FILE|X)\b", m[1]):
            words = shlex.split(m[1])
            start = 1 if words[:1] in (["train"], ["sample"]) else 0
            end = next((i for i, w in enumerate(words) if i >= start and not w.startswith("--")), len(words))
            out.append(words[:end])  # the command ends where prose goes on ("... --preset=cpu trains a ...")
    return out


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_commands_shown_parse_and_validate(path):
    """Every command a page shows runs as shown: its settings parse and pass validation."""
    for args in commands(path):
        try:
            _, cfg = babygpt.parse_args(args)
            babygpt.validate_config(cfg)
        except babygpt.UserError as e:
            pytest.fail(f"{rel(path)}: python babygpt.py {shlex.join(args)}: {e}")


def test_commands_readme_shows_enough_to_check():
    """The command check above would pass vacuously if it found no commands."""
    assert len(commands(README)) >= 6 and len(commands(QUICKSTART)) >= 4


# -----------------------------------------------------------------------------
# What a run prints: README's example has the format of the code's lines

LOG_LINE = re.compile(r"step \d+: train loss (\d+\.\d{4}|…), val loss (\d+\.\d{4}|…), "
                      r"speed: (\d+\.\d{2}|…) tokens/sec, time: (\d+m \d+\.\ds|…)")


def example_block():
    text = read(README)
    section = text[text.index("## What you will see"):]
    return code_blocks(section)[0].splitlines()


def test_output_readme_example_has_the_printed_format():
    """What README says a run prints is what a run prints: the log line, the save line and the phase line."""
    lines = example_block()
    steps = [line for line in lines if line.startswith("step ")]
    assert steps and all(LOG_LINE.fullmatch(line) for line in steps), steps
    assert all(printed_by_babygpt(line) for line in steps)
    assert f"模型已保存到{babygpt.save_path}" in lines
    total = [line for line in lines if line.startswith("total ")]
    assert len(total) == 1 and lines[-1] == total[0]
    assert phase_line(total[0]) and ELL not in total[0]
    assert "-" * 10 in lines


# -----------------------------------------------------------------------------
# README: its size, its opening, its test command; the install files

def test_readme_is_at_most_12000_characters():
    """README stays short enough to read before running anything."""
    assert len(read(README)) <= README_LIMIT


def test_readme_opening_gives_the_two_commands_and_the_cpu_install_first():
    """A fresh machine finds, before any other command, the CPU-only torch install, the training command and
    the test command; the Chinese quick start is linked before them."""
    text = read(README)
    first = FENCE.search(text)
    assert "(docs/quickstart.zh.md)" in text[:first.start()]
    block = [re.sub(r"\s+#.*", "", line).strip() for line in first[1].splitlines()]
    cpu = next(i for i, line in enumerate(block) if "download.pytorch.org/whl/cpu" in line)
    req = next(i for i, line in enumerate(block) if line.startswith("pip install -r requirements.txt"))
    assert cpu < req
    assert any(line.startswith("python babygpt.py") for line in block)
    assert ci_test_command() in block


def ci_test_command():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        runs = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
    assert len(runs) == 1
    return runs[0]


def test_readme_test_command_is_what_ci_runs():
    """The test command README and the Chinese page give is the one CI runs, so a green CI means it passes."""
    for path in (README, QUICKSTART):
        shown = {re.sub(r"\s+#.*", "", line).strip() for line in code_pieces(read(path)) if "pytest" in line}
        assert shown == {ci_test_command()}, rel(path)


def requirement_lines(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def version(text):
    return tuple(int(p) for p in text.split("."))


def test_requirements_keep_the_users_torch_and_ci_pins_them():
    """`pip install -r requirements.txt` keeps an installed supported torch (lower bounds only), while CI
    installs one exact, tested set through requirements-ci.txt."""
    bounds = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\d.]+)", line).groups() for line in requirement_lines("requirements.txt"))
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([\d.]+)", line).groups() for line in requirement_lines("requirements-ci.txt"))
    assert {"torch", "wandb", "numpy", "pytest"} <= set(bounds)
    assert set(pins) == set(bounds)
    assert all(version(pins[n]) >= version(bounds[n]) for n in bounds), (pins, bounds)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "pip install -r requirements.txt -c requirements-ci.txt" in f.read()


# -----------------------------------------------------------------------------
# Links and names

def test_links_between_pages_resolve():
    """A link from one page to another file of the project leads somewhere."""
    broken = []
    for path in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
            if not re.match(r"https?://", target) and not os.path.exists(
                    os.path.join(os.path.dirname(path), target.split("#")[0])):
                broken.append(f"{rel(path)}: {target}")
    assert not broken, broken


def test_names_of_code_in_the_docs_exist():
    """Functions, methods and constants the docs name (`train()`, `Run.finish()`, `AUTO_MARGIN`) are in the code."""
    source = read(os.path.join(ROOT, "babygpt.py")) + read(os.path.join(ROOT, ".ci", "run"))
    missing, seen = [], 0
    for path in PAGES:
        for code in inline_code(read(path)):
            if re.fullmatch(r"[A-Za-z_][\w.]*\(\)|[A-Z][A-Za-z]*\.[a-z_]\w*", code):
                seen += 1
                obj = babygpt
                for part in code.removesuffix("()").split("."):
                    obj = getattr(obj, part, None)
                if obj is None:
                    missing.append(f"{rel(path)}: {code}")
            elif re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", code):  # AUTO_MARGIN, WANDB_INIT_TIMEOUT
                seen += 1
                if code not in source:
                    missing.append(f"{rel(path)}: {code}")
    assert seen >= 8
    assert not missing, missing
