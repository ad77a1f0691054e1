"""``parity``: run RWKV backends side by side and say where they first diverge.

    parity run  --checkpoint PATH [--backends reference,tvm] [--ids ones:10] [--decode-steps 4] ...
    parity diff DUMP_EXPECTED DUMP_ACTUAL [--json PATH] [--html PATH]
    parity demo

Exit codes: 0 no divergence, 1 divergence found (or a backend crashed or hung: the verdict
"crashed"/"timed out"), 2 usage or input error (also a plug-in that cannot be made or breaks its
contract), 3 internal error (a bug; PARITY_DEBUG=1 shows the traceback, and a crashed backend's).
The CLI is an assembly of library calls (parity.session); it only parses, prints and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from parity.errors import ParityError
# Verdict text lives below both command lines; describe_divergence stays importable from here.
from parity.report.verdict import describe_divergence  # noqa: F401
from parity.report.verdict import model_check_lines
from parity.report.verdict import fmt as _fmt
from parity.report.verdict import console_width
from parity.report.verdict import verdict_line as _verdict_line
from parity.results import Record, RunResult

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_TERMINATED = 128 + 15  # SIGTERM, as a shell reports a process it killed
# Argument names (argparse dests) whose value is a file or directory the command writes.
OUTPUT_DESTS = ("json", "html", "markdown", "csv", "dump_dir")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO_ROOT / "fixtures" / "rwkv5_2-L4-C128-H2.pth"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other input error (no usage block)
        print(f"parity: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", type=Path, help="write the result as JSON")
    p.add_argument("--html", metavar="PATH", type=Path, help="write a self-contained HTML report")
    p.add_argument(
        "--tol", metavar="PATTERN=RTOL,ATOL[,SCALE]", action="append", default=[],
        help="tolerance override for stages matching PATTERN (fnmatch over stage names, e.g. 'L*.att.wkv'); repeatable",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or tables; only the verdict line")


def _byte_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        n = float(t[:-1] if t and t[-1] in units else t) * units[t[-1] if t and t[-1] in units else ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {text!r}")
    return int(n)


def estimate_dump_bytes(config, *, prefill_tokens: int, decode_steps: int, dumps: int) -> int:
    """About what a run's dumps take: every stage of every token in fp32 and the state after each
    step, per dump (one per backend, and in replay mode one more per replayed backend)."""
    from parity.stages import layer_stage_names

    C, F, V, L = config.n_embd, config.dim_ffn, config.vocab_size, config.n_layer
    per_layer = len(layer_stage_names(layer=0, version=config.version.value))
    # Every per-layer stage is C (= A) wide but ffn.k, which is F wide; emb and ln_out are C, logits V.
    per_token = C * (2 + L * (per_layer - 1)) + L * F + V
    state = L * (5 * C if config.version.value == "4" else 2 * C + config.n_head * config.head_size ** 2)
    return 4 * dumps * ((prefill_tokens + decode_steps) * per_token + (1 + decode_steps) * state)


def _check_dump_size(args, *, config, plan, backends: int) -> None:
    import shutil
    import tempfile

    dumps = backends + (backends - 1 if args.mode in ("replay", "both") else 0)
    need = estimate_dump_bytes(config, prefill_tokens=len(plan.prefill_ids), decode_steps=len(plan.decode_ids),
                               dumps=dumps)
    limit, why = args.max_dump_bytes, "--max-dump-bytes"
    if limit is None:
        where = Path(args.dump_dir) if args.dump_dir is not None else Path(tempfile.gettempdir())
        while not where.exists() and where != where.parent:
            where = where.parent
        # A quarter: the replays, the reports and everyone else on the disk need room too.
        limit, why = shutil.disk_usage(where).free // 4, f"a quarter of the free space on {where}"
    if need > limit:
        raise ParityError(f"this run's dumps would take about {need / 1e9:.3g} GB ({len(plan.prefill_ids)} prefill "
                          f"tokens + {len(plan.decode_ids)} decode steps, {dumps} dumps), more than "
                          f"{limit / 1e9:.3g} GB ({why}); shorten --ids/--decode-steps or raise --max-dump-bytes")


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("rwkv-parity")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="parity", description="Prove a compiled RWKV model computes what the reference computes.")
    ap.add_argument("--version", action="version", version=f"parity {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run backends on one checkpoint and compare every stage of every step")
    run.add_argument("--checkpoint", type=Path, help="ChatRWKV .pth, .safetensors or HF directory (default: the --scenario's)")
    run.add_argument("--backends", default="reference,tvm",
                     help="comma-separated; the first is the yardstick (default: reference,tvm). "
                          "Known: reference, tvm (debug build), tvm-instrumented (plain build + VM hook), "
                          "chatrwkv (the official rwkv package), hf (transformers, RWKV-4 only), "
                          "mutant/<name> (the bug zoo: parity selftest --list), module:attribute or file.py:attribute "
                          "(your own; docs/backends.md)")
    run.add_argument("--ids", default="ones:10", help="prompt ids: 1,2,3 | ones:N | random:N[:SEED] (default ones:10)")
    run.add_argument("--decode-steps", type=int, default=4, help="decode steps after the prefill (default 4)")
    run.add_argument("--decode-ids", help="the decode tokens, comma-separated (default: seeded random ids)")
    run.add_argument("--dump-dir", type=Path, help="keep the dumps here (default: a temporary directory)")
    run.add_argument("--max-dump-bytes", type=_byte_size, metavar="N[K|M|G]",
                     help="refuse, before starting, a run whose dumps would take more (default: a quarter of the "
                          "free space where they go)")
    run.add_argument("--corpus", type=Path, metavar="FILE|DIR",
                     help="many prompts: a text file (one prompt per line, through --template) or a directory of "
                          "scenario *.json files; one comparison each, KL and top-1 pooled over every token")
    run.add_argument(
        "--mode", choices=("replay", "propagated", "isolated", "both"), default="replay",
        help="replay (default): the reference replays every layer of each backend on that backend's own inputs, "
             "so a stage is blamed only for the error it adds, and propagated drift is judged against its "
             "envelope; propagated: the strict per-stage verdict of the propagated run; isolated: our compiled "
             "build runs every layer on the yardstick's inputs (others are replayed), own error only; "
             "both: replay with the compiled build isolated, side by side",
    )
    run.add_argument("--cache-dir", type=Path, help="compile cache (default $PARITY_CACHE_DIR or ~/.cache/rwkv-parity)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the compiled model runs: cpu (llvm build, default) or cuda (CUDA build; the torch "
                          "reference runs where --reference-device says)")
    run.add_argument("--reference-device", choices=("cpu", "cuda"), default="cpu",
                     help="where the torch reference runs, with its replays, rounding floor and fp64 arbiter: cpu "
                          "(default) or cuda (torch's GPU, TF32 and reduced-precision reductions off; recorded in "
                          "the run's JSON)")
    run.add_argument("--arbiter", action="store_true",
                     help="also run the reference in float64 and judge each backend by its error against fp64 relative "
                          "to the fp32 reference's own (the rule of torch dynamo's accuracy checker)")
    run.add_argument("--arbiter-multiplier", type=float, metavar="K", help="k in the arbiter rule (default 100, measured: benchmarks/calibrate_verdict.py)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", default=None,
                     help="a backend that takes longer than this for one step (the prefill or one decode step; "
                          "compiling is not counted) is stopped and reported as 'timed out' (default 1800; 0: no limit)")
    run.add_argument("--in-process", action="store_true",
                     help="run every backend in this process instead of a worker process each (for a debugger; "
                          "a crash then ends the run; also PARITY_IN_PROCESS=1)")
    run.add_argument("--only-layer", type=int, metavar="L", help="isolated mode: record only layer L (a bisect repro)")
    run.add_argument("--only-step", type=int, metavar="S", help="isolated mode: record only step S (0 = prefill)")
    from parity.scenarios import add_text_args

    add_text_args(run)
    _add_output_args(run)
    from parity.explain.cli import add_explain_flags

    add_explain_flags(run)

    diff = sub.add_parser("diff", help="compare two saved dumps")
    diff.add_argument("expected", type=Path, help="dump directory of the yardstick (e.g. the reference)")
    diff.add_argument("actual", type=Path, help="dump directory under test")
    diff.add_argument("--checkpoint", type=Path,
                      help="the model both dumps ran: the reference then replays each dump's layers on its own "
                           "inputs, so the verdict separates error a stage adds from drift (without it: the strict "
                           "per-stage verdict)")
    _add_output_args(diff)

    bis = sub.add_parser("bisect", help="narrow a divergence to its step, layer and stage with isolated runs")
    bis.add_argument("--checkpoint", required=True, type=Path, help="ChatRWKV .pth, .safetensors or HF directory")
    bis.add_argument("--backends", default="reference,tvm", help="YARDSTICK,SUSPECT (default reference,tvm)")
    bis.add_argument("--ids", default="ones:10", help="prompt ids (as for run)")
    bis.add_argument("--decode-steps", type=int, default=4, help="decode steps after the prefill (default 4)")
    bis.add_argument("--decode-ids", help="the decode tokens, comma-separated")
    bis.add_argument("--cache-dir", type=Path, help="compile cache (default $PARITY_CACHE_DIR or ~/.cache/rwkv-parity)")
    bis.add_argument("--tol", metavar="PATTERN=RTOL,ATOL[,SCALE]", action="append", default=[],
                     help="tolerance override, as for run; repeatable")
    add_explain_flags(bis)
    bis.add_argument("--json", metavar="PATH", type=Path,
                     help="write the outcome as JSON: every decision, the faulty stage's record, the repro command")
    bis.add_argument("--html", metavar="PATH", type=Path,
                     help="write the HTML report of the comparison the bisect ran (both capture modes)")
    bis.add_argument("-q", "--quiet", action="store_true", help="no decisions or progress; only the verdict line")

    st = sub.add_parser("selftest", help="run the bug zoo: every injected porting bug must be found where it is")
    st.add_argument("--only", help="comma-separated mutant names (default: all)")
    st.add_argument("--cache-dir", type=Path, help="compile cache (default $PARITY_CACHE_DIR or ~/.cache/rwkv-parity)")
    st.add_argument("--json", type=Path, help="write the table as JSON")
    st.add_argument("--list", action="store_true", help="list the mutants and exit")
    st.add_argument("--checkpoint", type=Path,
                    help="run the zoo on this checkpoint instead of the bundled fixtures (e.g. a released shape made by "
                         "parity synth); mutants of another RWKV version are skipped")

    convert = sub.add_parser("convert", help="convert a checkpoint: .pth <-> .safetensors <-> HF directory (v4)")
    convert.add_argument("source", type=Path, help=".pth, .safetensors or HF RWKV directory")
    convert.add_argument("dest", type=Path, help="*.pth, *.safetensors, or a new directory (HF layout, v4 only)")

    from parity.explain.cli import add_explain_parser
    from parity.prompt.cli import add_prompt_parser
    from parity.report.cli import add_report_parser
    from parity.synth import add_synth_parser
    from parity.tokenizer.cli import add_tokenize_parser

    add_tokenize_parser(sub)
    add_report_parser(sub)
    add_synth_parser(sub)
    add_prompt_parser(sub)
    add_explain_parser(sub)

    demo = sub.add_parser("demo", help="reference vs TVM on the bundled fixture, ten all-ones ids, 4 decode steps")
    demo.add_argument("--report-dir", type=Path, default=Path("reports"), help="where the report goes (default reports/)")
    demo.add_argument("--cache-dir", type=Path, help="compile cache directory")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress or tables; only the verdict line")
    # Every command that writes user files refuses an existing destination unless --force (checked
    # once, in main, before any work). demo is exempt: it owns REPORT_DIR/demo.* and rewrites them.
    for name, p in sub.choices.items():
        dests = {a.dest for a in p._actions}
        if name != "demo" and dests & set(OUTPUT_DESTS) and "force" not in dests:
            p.add_argument("--force", action="store_true",
                           help="overwrite output files/directories that exist (default: refuse)")
    convert.add_argument("--force", action="store_true", help="overwrite DEST if it exists (default: refuse)")
    return ap


# -- output -------------------------------------------------------------------------------------
def _print_pairs(console, result: RunResult) -> None:
    from rich.table import Table

    table = Table(title="every pair (the first named is the yardstick)")
    for col in ("expected", "actual", "verdict", "first divergence", "worst logits"):
        table.add_column(col, justify="right" if col == "worst logits" else "left")
    for c in result.comparisons:
        fd = c.first_divergence
        where = "-" if fd is None else f"step {fd.step} {fd.stage}" + (f" row {fd.row}" if fd.row is not None else "")
        style = "green" if fd is None and c.verdict == "no divergence" else "red"
        table.add_row(result.label(c.expected), result.label(c.actual), f"[{style}]{c.verdict}[/]", where,
                      _fmt(c.summary.worst_logits_max_abs if c.summary else None))
    console.print(table)
    odd = result.odd_one_out
    if odd:
        console.print(f"odd one out: [bold]{odd['backend']}[/] — {odd['explanation']}" if odd["backend"] else odd["explanation"])


# A table row per step reads well up to about this many steps; a longer run (a 3,000-step decode)
# shows the first and last steps, every failing one and the worst, and folds each stretch between
# them into one row of its totals, so the log stays short and nothing that failed is folded away.
MAX_STEP_ROWS = 24


def step_rows(steps: list[dict], records: list[Record], *, limit: int = MAX_STEP_ROWS) -> list[dict]:
    """Per step: label, records, failed, worst record (by max_abs), worst logits max_abs; folded past ``limit``."""
    def worst_of(recs):
        return max(recs, key=lambda r: r.max_abs if isinstance(r.max_abs, float) else float("inf"))

    by_step: dict[int, list[Record]] = {}
    for r in records:
        by_step.setdefault(r.step, []).append(r)
    rows = []
    for step in steps:
        recs = by_step.get(step["index"], [])
        if recs:
            logits = [r.max_abs for r in recs if r.stage == "logits"]
            rows.append({"label": "prefill" if step["kind"] == "prefill" else f"decode {step['index']}",
                         "records": len(recs), "failed": sum(not r.passed for r in recs),
                         "worst": worst_of(recs), "logits": logits[0] if logits else None, "recs": recs})
    if len(rows) <= limit:
        return rows
    worst_i = rows.index(max(rows, key=lambda row: row["worst"].max_abs if isinstance(row["worst"].max_abs, float)
                             else float("inf")))
    keep = {0, 1, 2, len(rows) - 1, worst_i} | {i for i, row in enumerate(rows) if row["failed"]}
    keep = set(sorted(keep)[: limit - 1]) | {len(rows) - 1}
    out, fold = [], []
    for i, row in enumerate(rows + [None]):
        if row is not None and i not in keep:
            fold.append(row)
            continue
        if fold:
            recs = [r for f in fold for r in f["recs"]]
            logits = [f["logits"] for f in fold if isinstance(f["logits"], float)]
            out.append({"label": f"{fold[0]['label']} .. {fold[-1]['label'].split()[-1]} ({len(fold)} steps)",
                        "records": len(recs), "failed": sum(f["failed"] for f in fold), "worst": worst_of(recs),
                        "logits": max(logits) if logits else None, "recs": recs})
            fold = []
        if row is not None:
            out.append(row)
    return out


def _print_summary(console, result: RunResult) -> None:
    from rich.table import Table

    exp, act = result.expected, result.actual
    table = Table(title=f"{act.get('backend')} ({act.get('mode')}) vs {exp.get('backend')} ({exp.get('mode')}), {act.get('dtype')}")
    for col in ("step", "records", "failed", "worst stage", "max abs", "rms-rel", "logits"):
        table.add_column(col, justify="left" if col in ("step", "worst stage") else "right", no_wrap=True)
    for row in step_rows(result.steps, result.records):
        table.add_row(row["label"], str(row["records"]), f"[red]{row['failed']}[/]" if row["failed"] else "0",
                      row["worst"].stage, _fmt(row["worst"].max_abs), _fmt(row["worst"].rms_rel),
                      _fmt(row["logits"]))
    console.print(table)
    # With two backends the table above is the one pair; the pair table adds a line only when
    # there are more pairs, or a backend crashed (its row says so).
    if len(result.comparisons) > 1 or result.crashes:
        _print_pairs(console, result)
    if result.modes:
        for name, m in result.modes.items():
            if m is not None:
                fd = m.first_divergence
                console.print(f"{name:>10}: " + (m.verdict if fd is None else describe_divergence(fd)))
    for line in model_check_lines(result):
        console.print(line)
    for block in result.arbiter or []:
        fd = block["first_divergence"]
        worst = max((r["min_multiplier"] for r in block["records"] if isinstance(r["min_multiplier"], float)), default=0.0)
        line = (f"fp64 arbiter, {block['backend']}: " + ("within " if fd is None else "OUT of ")
                + f"{block['multiplier']:g}x the fp32 reference's own error against fp64 + floor; "
                + f"largest multiplier needed {worst:.3g}")
        if fd is not None:
            line += f"; first at step {fd['step']} {fd['stage']} (error {fd['actual_error']:.3g} vs reference's {fd['reference_error']:.3g})"
        console.print(line)
    for k in result.known_differences or []:
        flag = "[yellow]applies[/]" if k["applies"] else "[dim]no effect here[/]"
        console.print(f"known difference of {k['backend']}: [bold]{k['name']}[/] ({flag}) — {k['detail']}")
    for n in result.notes or []:
        console.print(f"note from {result.label(n['backend'])}: {n['note']}", markup=False)
    for crash in result.crashes:
        where = f"; its unfinished dump: {crash.partial_dump}" if crash.partial_dump and result.run.extra.get("partial_dumps") else ""
        tb = "; PARITY_DEBUG=1 prints its traceback" if crash.traceback and not os.environ.get("PARITY_DEBUG") else ""
        console.print(f"{crash.name} {crash.kind}: {crash.error}{where}{tb}", markup=False)
    missing = result.missing or []
    if missing:
        console.print(f"[dim]{len(missing)} stage records exist on one side only (not compared), "
                      f"e.g. {missing[0]['stage']} (missing in {missing[0]['missing_in']})[/]")
    # Partial rows (a backend holding e.g. the last token's logits only): what was compared, and
    # what could not be, so a stage judged on one row is never mistaken for a full comparison.
    partial = [r for r in result.records if r.rows is not None]
    if partial:
        r = partial[0]
        console.print(f"{len(partial)} records compared on the token rows both sides hold, e.g. {r.stage} at step "
                      f"{r.step} on row(s) {', '.join(map(str, r.rows[:8]))}", markup=False)
    for nc in (result.not_comparable or [])[:3]:
        console.print(f"not comparable: {nc.get('stage')} at step {nc.get('step')}: the sides hold rows "
                      f"{nc.get('expected_rows')} and {nc.get('actual_rows')}, none in common", markup=False)


def write_json(path: Path, value) -> None:
    """``value`` as JSON (no NaN), streamed to ``path``: a real-size run's result is tens of MB of
    text (0.1B, 64 decode steps: 60 MB), which json.dumps would hold whole, twice with the newline
    added, in the process's peak (issue 9). Objects are indented, one key a line; a long list has one
    compact element a line (a record), each encoded by json's C encoder: json.dump streams through
    the pure-Python one, ~1 ms a record (3000 decode steps of the 4-layer fixture: 320k records)."""
    tmp = Path(path).with_name(Path(path).name + ".part")  # never a half-written result under the name
    try:
        with open(tmp, "w") as fh:
            _stream_json(fh, value, depth=0)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _holds_long_list(value) -> bool:
    return isinstance(value, dict) and any(isinstance(v, list) and len(v) > 64 for v in value.values())


def _stream_json(fh, value, *, depth: int) -> None:
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        fh.write("{\n")
        for i, (key, item) in enumerate(value.items()):
            fh.write(f",\n{inner}{json.dumps(key)}: " if i else f"{inner}{json.dumps(key)}: ")
            _stream_json(fh, item, depth=depth + 1)
        fh.write(f"\n{pad}}}")
    elif isinstance(value, list) and value and (len(value) > 64 or any(_holds_long_list(v) for v in value)):
        fh.write("[\n")
        for i, item in enumerate(value):
            if i:
                fh.write(",\n")
            fh.write(inner)
            if _holds_long_list(item):  # a comparison: its records stream too
                _stream_json(fh, item, depth=depth + 1)
            else:
                fh.write(json.dumps(item, allow_nan=False, separators=(",", ":")))
        fh.write(f"\n{pad}]")
    else:
        fh.write(json.dumps(value, allow_nan=False))


def _write_outputs(result: dict, *, json_path: Path | None, html_path: Path | None, console) -> None:
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, result)
        if console:
            console.print(f"JSON result: {json_path}")
    if html_path:
        from parity.report.html import write_html

        write_html(result, html_path)
        if console:
            console.print(f"HTML report: {html_path}")


def _overrides(texts: list[str]):
    from parity.compare import parse_override

    return [parse_override(t) for t in texts]


class _Progress:
    """rich progress on stderr: compile / preparation events as lines, one bar per backend's steps."""

    def __init__(self, *, quiet: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.console = Console(stderr=True, width=console_width(sys.stderr))
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console, transient=False, disable=quiet,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def event(self, msg: str) -> None:
        if not self.quiet:
            self.progress.console.print(f"[dim]·[/] {msg}")

    def step(self, backend: str, index: int, total: int) -> None:
        if backend not in self.tasks:
            self.tasks[backend] = self.progress.add_task(f"{backend} steps", total=total)
        self.progress.update(self.tasks[backend], completed=index + 1)


# -- commands -----------------------------------------------------------------------------------
def _finish(result: dict, *, args, console, json_path, html_path) -> int:
    """Write ``result`` (its JSON form) where asked, print it (typed), and return the exit code."""
    from parity.report.verdict import as_result

    _write_outputs(result, json_path=json_path, html_path=html_path, console=None if args.quiet else console)
    typed = as_result(result)
    if not args.quiet:
        _print_summary(console, typed)
    failed = typed.failed
    for crash in typed.crashes:
        if crash.traceback and os.environ.get("PARITY_DEBUG"):
            # The port author's view: where in their code (or, for a signal, which Python frame) it died.
            print(f"parity: {crash.name} {crash.kind}; its traceback:\n{crash.traceback.rstrip()}", file=sys.stderr)
    console.print(_verdict_line(typed), style=None if args.quiet else ("bold red" if failed else "green"), markup=False)
    return EXIT_DIVERGED if failed else EXIT_OK


def cmd_run(args, console) -> int:
    from parity.checkpoint import load_checkpoint
    from parity.greedy import run_greedy
    from parity.scenarios import plan_from_args, resolve_checkpoint, run_keys
    from parity.reference import check_reference_device
    from parity.session import DEFAULT_TIMEOUT, run_parity

    check_reference_device(args.reference_device)  # before a large checkpoint is loaded: one line, exit 2
    overrides = _overrides(args.tol)
    ck = load_checkpoint(resolve_checkpoint(args))
    if args.corpus is not None:
        return _run_corpus(args, console, ck=ck, overrides=overrides)
    plan, info = plan_from_args(args, ck)
    for line in info["warnings"]:
        print(f"parity: warning: {line}", file=sys.stderr)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    _check_dump_size(args, config=ck.config, plan=plan, backends=len(backends))
    if not args.quiet:
        console.print(f"{ck.config.describe()} from {ck.path} (sha256 {ck.sha256[:12]})")
        if info.get("text") is not None:
            console.print(f"prompt ({info['template']} template): {info['text']!r} -> {len(plan.prefill_ids)} ids")
    from parity.explain.cli import attach_explanation, kept_dumps

    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout  # the run's and greedy decoding's
    with _Progress(quiet=args.quiet) as prog, kept_dumps(args) as dump_dir:
        outcome = run_parity(
            ck, backends=backends, plan=plan, dump_dir=dump_dir, overrides=overrides,
            cache_dir=args.cache_dir, on_event=prog.event, on_step=prog.step, mode=args.mode,
            only_layer=args.only_layer, only_step=args.only_step,
            arbiter=args.arbiter, arbiter_multiplier=args.arbiter_multiplier, device=args.device,
            reference_device=args.reference_device,
            timeout=timeout, in_process=args.in_process or None,
        )
        # Greedy decoding drives the torch backends and plug-ins in this process (compiled builds in
        # workers): one that just crashed in its worker could take the verdict and the reports down
        # with it, so it is skipped then.
        greedy = None if outcome.crashed else run_greedy(
            ck, backends=backends, info=info, cache_dir=args.cache_dir, on_event=prog.event,
            in_process=args.in_process or None, timeout=timeout)
        if outcome.crashed and info.get("greedy_steps"):
            prog.event("greedy decoding skipped: a backend crashed or hung")
        if args.explain:  # after the verdict, while the dumps still exist
            prog.event("explaining the first divergence")
            attach_explanation(outcome.result, checkpoint=ck, hypotheses=args.hypothesis)
            if args.dump_dir is None:
                outcome.result["run"].pop("dumps", None)  # a temporary directory, gone now
    result = outcome.result
    result["run"].update(run_keys(info))
    if greedy is not None:
        result["run"]["greedy"] = greedy
        if not args.quiet:
            _print_greedy(console, greedy)
    code = _finish(result, args=args, console=console, json_path=args.json, html_path=args.html)
    if result.get("explanation"):
        from parity.explain.cli import print_explanation

        print_explanation(console, result["explanation"], quiet=args.quiet)
    return code


def _run_corpus(args, console, *, ck, overrides) -> int:
    from parity.corpus import run_corpus

    if args.greedy or args.dump_dir or args.html or args.only_layer is not None or args.only_step is not None or args.arbiter:
        raise ParityError("--corpus runs many prompts: --greedy, --dump-dir, --html, --only-* and --arbiter take one")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    warned: set[str] = set()

    def on_prompt(name: str, summary: dict) -> None:
        for warning in summary["warnings"]:
            key = warning.split(":")[0]
            if key not in warned:  # e.g. vocab folding: said once, not once per prompt
                warned.add(key)
                print(f"parity: warning: {name}: {warning}", file=sys.stderr)
        e2e = summary["end_to_end"] or {}
        line = (f"{name}: {summary['verdict']} ({summary['prefill_tokens']} + {summary['decode_steps']} tokens; "
                f"KL max {_fmt(e2e.get('kl_max'))}, top-1 {100 * e2e.get('top1_agreement', 0):.4g}%)")
        if summary["first_divergence"] is not None:
            line += f"; {describe_divergence(summary['first_divergence'])}"
        if not args.quiet:
            console.print(line, markup=False, highlight=False)

    with _Progress(quiet=args.quiet) as prog:
        out = run_corpus(args, ck, backends=backends, overrides=overrides, on_prompt=on_prompt,
                         run_kwargs=dict(cache_dir=args.cache_dir, on_event=prog.event, on_step=prog.step, mode=args.mode,
                                         device=args.device, reference_device=args.reference_device))
    agg = out["corpus"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, out)
    verdict = "no divergence" if agg["diverged"] == 0 else f"DIVERGENCE in {agg['diverged']} of {agg['prompts']} prompts"
    console.print(f"corpus: {verdict} ({agg['prompts']} prompts, {agg['rows']} logits rows; KL mean {_fmt(agg['kl_mean'])}, "
                  f"p99 {_fmt(agg['kl_p99'])}, p99.9 {_fmt(agg['kl_p99_9'])}, max {_fmt(agg['kl_max'])} nats; "
                  f"top-1 agreement {100 * (agg['top1_agreement'] or 0):.4g}%, {agg['top1_ties']} near-ties)",
                  markup=False, highlight=False)
    return EXIT_OK if agg["diverged"] == 0 else EXIT_DIVERGED


def _print_greedy(console, greedy: dict) -> None:
    for name, side in greedy["backends"].items():
        text = f" {side['text']!r}" if side.get("text") is not None else ""
        console.print(f"greedy {name}: {side['tokens']}{text}")
    fd = greedy["first_token_divergence"]
    console.print("greedy: every backend chose the same tokens" if fd is None else f"greedy: {fd['explanation']}")


def cmd_diff(args, console) -> int:
    from parity.session import diff_dumps

    result = diff_dumps(args.expected, args.actual, checkpoint=args.checkpoint, overrides=_overrides(args.tol))
    return _finish(result, args=args, console=console, json_path=args.json, html_path=args.html)


def cmd_demo(args, console) -> int:
    from parity.checkpoint import load_checkpoint
    from parity.dumpers.backends import RunPlan
    from parity.session import default_decode_ids, run_parity

    t0 = time.perf_counter()
    ck = load_checkpoint(DEMO_CHECKPOINT)
    plan = RunPlan(prefill_ids=(1,) * 10, decode_ids=default_decode_ids(steps=4, vocab_size=ck.config.vocab_size))
    report_dir = args.report_dir
    if not args.quiet:
        console.print(f"demo: reference vs TVM (llvm) on {ck.config.describe()}, ten all-ones ids + 4 decode steps")
    with _Progress(quiet=args.quiet) as prog:
        outcome = run_parity(
            ck, backends=["reference", "tvm"], plan=plan, dump_dir=report_dir / "demo-dumps",
            cache_dir=args.cache_dir, on_event=prog.event, on_step=prog.step, command="parity demo",
        )
    code = _finish(outcome.result, args=args, console=console,
                   json_path=report_dir / "demo.json", html_path=report_dir / "demo.html")
    if not args.quiet:
        console.print(f"[dim]demo took {time.perf_counter() - t0:.1f} s[/]")
    return code


def cmd_bisect(args, console) -> int:
    from parity.bisect import bisect
    from parity.checkpoint import load_checkpoint
    from parity.dumpers.backends import RunPlan
    from parity.session import default_decode_ids, parse_ids

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) != 2:
        raise ParityError("bisect takes exactly two backends: YARDSTICK,SUSPECT")
    ck = load_checkpoint(args.checkpoint)
    prefill = parse_ids(args.ids, vocab_size=ck.config.vocab_size)
    decode = (parse_ids(args.decode_ids, vocab_size=ck.config.vocab_size) if args.decode_ids
              else default_decode_ids(steps=args.decode_steps, vocab_size=ck.config.vocab_size))
    plan = RunPlan(prefill_ids=prefill, decode_ids=decode)
    with _Progress(quiet=args.quiet) as prog:
        out = bisect(ck, backends=backends, plan=plan, cache_dir=args.cache_dir, overrides=_overrides(args.tol),
                     on_decision=None if args.quiet else lambda line: prog.progress.console.print(line, highlight=False),
                     on_event=None)
    explanation = None
    if args.explain and out.found is not None:
        from parity.explain.cli import explain_bisect

        explanation = explain_bisect(ck, backends=backends, plan=plan, found=out.found, cache_dir=args.cache_dir,
                                     hypotheses=args.hypothesis)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"backends": backends, "decisions": out.decisions, "found": out.found,
                                         "propagated": out.propagated, "repro": out.repro,
                                         "explanation": explanation}, indent=1) + "\n")
        if not args.quiet:
            console.print(f"JSON outcome: {args.json}")
    if args.html and out.result is not None:
        from parity.report.html import write_html

        write_html(out.result, args.html)
        if not args.quiet:
            console.print(f"HTML report: {args.html}")
    if out.found is None:
        console.print("bisect: no faulty stage", style=None if args.quiet else "green")
        return EXIT_OK
    fd = out.found
    console.print(f"bisect: first faulty stage {fd['stage']} at step {fd['step']} "
                  f"({'prefill' if fd['step'] == 0 else 'decode'}), layer {fd['layer']}",
                  style=None if args.quiet else "bold red")
    if not args.quiet:
        console.print(f"reproduce just that layer and step:\n  {out.repro}")
    if explanation is not None:
        from parity.explain.cli import print_explanation

        print_explanation(console, explanation, quiet=args.quiet)
    return EXIT_DIVERGED


def cmd_selftest(args, console) -> int:
    from rich.table import Table

    from parity.selftest import every_entry, run_selftest

    CATALOGUE = every_entry()  # the bug zoo and its crashing plug-ins (plugin:<factory>)
    if args.list:
        for m in CATALOGUE.values():
            console.print(f"{m.name:28s} {m.side:9s} {m.description}", markup=False)
        return EXIT_OK
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    for n in names or []:
        if n not in CATALOGUE:
            from parity.dumpers.registry import did_you_mean

            raise ParityError(f"unknown mutant {n!r}{did_you_mean(n, CATALOGUE)} (parity selftest --list names them)")
    from parity.selftest import applicable

    ck = None
    if args.checkpoint is not None:
        from parity.checkpoint import load_checkpoint

        ck = load_checkpoint(args.checkpoint)
        skipped = [n for n, m in CATALOGUE.items() if not applicable(m, ck) and (names is None or n in names)]
        if skipped:
            console.print(f"[dim]skipped (another RWKV version than {ck.config.describe()}): {', '.join(skipped)}[/]")
        names = [n for n in (names or CATALOGUE) if n not in skipped]
    if names is None:
        names = list(CATALOGUE)
    with _Progress(quiet=False) as prog:
        task = prog.progress.add_task("mutants", total=len(names or CATALOGUE))
        rows = run_selftest(names=names, cache_dir=args.cache_dir, on_row=lambda row: prog.progress.advance(task),
                            checkpoint=ck)
    table = Table(title="bug zoo: where each injected bug must be found, and where it was")

    def where(fd):
        if fd is None:
            return "[red]not found[/]"
        step = "prefill" if fd["step"] == 0 else f"decode {fd['step']}"
        return f"{step} {fd['stage']}"

    for col in ("mutant", "expected", "found (propagated)", "found (isolated)", "result"):
        table.add_column(col, no_wrap=col != "mutant", min_width=24 if col == "mutant" else None)
    def fault(row) -> tuple[str, str]:
        from parity.mutants.crash import CRASH_PLUGINS, EXPECTED_SIGNAL

        m = row.mutant
        plugin = CRASH_PLUGINS.get(m.name.removeprefix("plugin:"))
        sig = plugin.signal if plugin is not None else EXPECTED_SIGNAL.get(m.name)
        kind = {"crash": "crashed", "hang": "timed out"}[m.fault]
        exp = f"{kind} {m.propagated.describe()}".rstrip() + (f" ({sig})" if sig else "")
        c = row.crash
        if c is None:
            return exp, "[red]no crash reported[/]"
        step = "prefill" if c["step"] == 0 else f"decode {c['step']}"
        got = f"{c['kind']} {step} {c.get('kernel') or ''}".rstrip() + (f" ({c['signal']})" if c.get("signal") else "")
        return exp, got

    for row in rows:
        if row.mutant.fault is not None:
            exp, got = fault(row)
            table.add_row(row.mutant.name, exp, got, "-", "[green]pass[/]" if row.passed else "[red]FAIL[/]")
            continue
        exp = row.mutant.propagated.describe()
        if row.mutant.isolated != row.mutant.propagated:
            exp += f" / iso {row.mutant.isolated.describe()}"
        extra = f" (odd one out: {row.odd_one_out})" if row.mutant.side == "reference" else ""
        table.add_row(row.mutant.name, exp, where(row.found_propagated), where(row.found_isolated) + extra,
                      "[green]pass[/]" if row.passed else "[red]FAIL[/]")
    console.print(table)
    passed = sum(r.passed for r in rows)
    console.print(f"{passed}/{len(rows)} mutants localised in both modes")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    return EXIT_OK if passed == len(rows) else EXIT_DIVERGED


def cmd_convert(args, console) -> int:
    from parity.checkpoint import load_checkpoint, save_checkpoint

    dest = args.dest
    if dest.suffix not in (".pth", ".safetensors", ""):
        raise ParityError(f"unknown output format {dest.suffix!r} for {dest}: give DEST a .pth or .safetensors suffix, "
                          "or no suffix for an HF directory (RWKV-4 only)")
    if dest.exists() and dest.resolve() == args.source.resolve():
        raise ParityError("source and destination are the same path")
    if dest.exists() and dest.is_dir() != (dest.suffix == ""):
        raise ParityError(f"{dest} exists and is {'a directory' if dest.is_dir() else 'a file'}; a "
                          f"{dest.suffix or 'suffix-less (HF directory)'} destination must be "
                          f"{'a file' if dest.suffix else 'a directory'}, even with --force")
    ck = load_checkpoint(args.source)
    if dest.is_dir() and args.force:
        # --force replaces an HF checkpoint directory's own files, never anything else in it.
        strangers = sorted(p.name for p in dest.iterdir() if p.name not in ("config.json", "model.safetensors"))
        if strangers:
            raise ParityError(f"{dest} holds files that are not an HF checkpoint's ({', '.join(strangers[:3])}); "
                              "--force replaces a checkpoint directory, not other files: choose a new directory")
        for name in ("config.json", "model.safetensors"):
            (dest / name).unlink(missing_ok=True)
    out = save_checkpoint(ck, args.dest)
    again = load_checkpoint(out)  # read it back: a conversion that cannot be loaded is not done
    same = again.weights.keys() == ck.weights.keys() and all(again.weights[k].equal(ck.weights[k]) for k in ck.weights)
    if not same or again.config != ck.config:
        raise ParityError(f"{out} does not read back as the same checkpoint")
    console.print(f"wrote {out} ({ck.config.describe()}, {len(ck.weights)} tensors, bit-exact round trip)")
    return EXIT_OK


def _check_args(args) -> None:
    """Input checks common to every command, made before any work starts."""
    from parity.report.cli import refuse_overwrite

    for name in ("ids", "decode_ids"):
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            flag = "--" + name.replace("_", "-")
            raise ParityError(f"{flag} is empty; give ids such as 1,2,3, ones:N or random:N[:SEED] (or leave {flag} out)")
    for name in ("json", "html", "markdown", "csv"):
        path = getattr(args, name, None)
        if path is not None and str(path) != "-" and Path(path).is_dir():
            raise ParityError(f"--{name} {path} is a directory; give a file path (--force replaces files, never directories)")
    if args.command == "demo":
        return  # demo rewrites its own REPORT_DIR/demo.json, demo.html and demo-dumps/ on every run, by design
    paths = [getattr(args, name, None) for name in OUTPUT_DESTS]
    if args.command == "convert":
        paths.append(args.dest)
    refuse_overwrite(paths, force=getattr(args, "force", False))


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, a cancelled job), raised like Ctrl-C so every ``finally`` and context
    manager runs and temporary dump directories are removed."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # stray words (e.g. --ids 1 2 3) belong to the subcommand: point at its --help, no usage block
        print(f"parity: error: unrecognized arguments: {' '.join(extra)} "
              f"(see parity {args.command} --help)", file=sys.stderr)
        return EXIT_USAGE
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, width=console_width(sys.stdout))
    try:
        _check_args(args)
        from parity.explain.cli import cmd_explain
        from parity.prompt.cli import cmd_prompt
        from parity.report.cli import cmd_report
        from parity.synth import cmd_synth
        from parity.tokenizer.cli import cmd_tokenize

        commands = {
            "prompt": cmd_prompt, "explain": cmd_explain,
            "run": cmd_run, "diff": cmd_diff, "demo": cmd_demo, "tokenize": cmd_tokenize, "synth": cmd_synth,
            "convert": cmd_convert, "report": cmd_report, "bisect": cmd_bisect, "selftest": cmd_selftest,
        }
        return commands[args.command](args, console)
    except ParityError as exc:
        if os.environ.get("PARITY_DEBUG") and getattr(exc, "worker_traceback", None):
            # Raised in a backend's worker process: its traceback, for the port author.
            print(f"parity: the backend's worker process raised:\n{exc.worker_traceback.rstrip()}", file=sys.stderr)
        print(f"parity: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _Terminated:
        print("parity: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the machine, not the tool: a full disk, a read-only or vanished path
        if os.environ.get("PARITY_DEBUG"):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"parity: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug (ours, or a plug-in's): one line, its own exit code, never "divergence"
        if os.environ.get("PARITY_DEBUG"):
            if getattr(exc, "traceback_text", None):  # a worker's: the frames are in the child
                print(f"parity: the backend's worker process raised:\n{exc.traceback_text.rstrip()}", file=sys.stderr)
            raise
        print(f"parity: internal error: {type(exc).__name__}: {exc} (rerun with PARITY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
