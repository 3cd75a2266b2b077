"""`deltakd eval`, `deltakd sweep`, `deltakd report` and `deltakd diagnose`."""

from __future__ import annotations

import argparse
import json

from deltakd.config.sections import GENERATION_BACKENDS, VLLM_DTYPES


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)
    _register_sweep(sub)
    _register_report(sub)
    _register_diagnose(sub)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (8)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="reply length cap (128)")
    g.add_argument(
        "--sample", action="store_true", help="sample instead of greedy decoding (default greedy)"
    )
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    g.add_argument(
        "--backend",
        choices=GENERATION_BACKENDS,
        default="hf",
        help="generation engine: hf (transformers generate) or vllm (needs the vllm extra)",
    )
    v = p.add_argument_group("vLLM engine (with --backend vllm)")
    v.add_argument("--max-model-len", type=int, default=None, help="prompt + reply tokens cap")
    v.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="GPU memory fraction (0.9)"
    )
    v.add_argument("--kv-cache-gib", type=float, default=None, help="fixed KV cache size")
    v.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (1)")


def _settings(args: argparse.Namespace):
    from deltakd.generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        backend=args.backend,
    )


def _configure_vllm(args: argparse.Namespace, dtype: str = "auto") -> None:
    """With --backend vllm, the engine settings every evaluation of this command uses."""
    if args.backend != "vllm":
        return
    from deltakd.generation.vllm import VLLMSettings, configure_engine

    configure_engine(
        VLLMSettings(
            dtype=dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_gib=args.kv_cache_gib,
            tensor_parallel_size=args.tensor_parallel_size,
            seed=args.seed,
        )
    )


# ---------------------------------------------------------------- eval


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="generate replies and score them (ROUGE-1/2/L F1, exact match for math)",
        description=(
            "Generate a reply for every prompt of a dataset with the HF generate API and score "
            "it: ROUGE-1/2/L F1 (rouge-score, stemming on) against the reference reply, and "
            "exact match of the final answer when the rows carry an `answer`."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory (save_pretrained), mini:<role> or a Hub name",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument(
        "--data",
        required=True,
        help="data spec: mini:instruct, mini:math, a .jsonl file, ultrachat:..., openmath:...",
    )
    p.add_argument(
        "--split", default=None, help="data split (default: the spec's test split, e.g. test)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded random sample of N rows"
    )
    p.add_argument("--out", default=None, help="write predictions.jsonl + summary.md here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=VLLM_DTYPES,  # the weights' dtype for hf, the engine's for vllm
        help="weights dtype (float32)",
    )
    p.add_argument("--json", action="store_true", help="end with one line of JSON metrics")
    _add_generation_args(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from deltakd.eval.evaluate import evaluate_spec

    _configure_vllm(args, args.dtype)
    result = evaluate_spec(
        args.model,
        args.tokenizer,
        args.data,
        split=args.split,
        limit=args.limit,
        settings=_settings(args),
        out_dir=args.out,
        device=args.device,
        dtype=args.dtype,
    )
    m = result.metrics()
    print(f"model {args.model}  data {args.data} ({result.meta['split']})  n={m['n']}")
    print(
        f"ROUGE-1 {100 * m['rouge1']:.2f}  ROUGE-2 {100 * m['rouge2']:.2f}  "
        f"ROUGE-L {100 * m['rougeL']:.2f}"
        + (f"  exact match {100 * m['exact_match']:.2f}" if m["exact_match"] is not None else "")
    )
    if args.out:
        print(f"wrote {args.out}/predictions.jsonl and {args.out}/summary.md")
    if args.json:
        print(json.dumps(m))
    return 0


# ---------------------------------------------------------------- sweep


def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="train + evaluate every point of a grid of config overrides (resumable)",
        description=(
            "Expand --grid into the cartesian product of overrides, run `deltakd train CONFIG "
            "key=value ...` for each into OUT/<run-name>, evaluate each run and write "
            "OUT/<run-name>/eval.json. Finished runs are skipped, so re-running resumes; runs "
            "that diverge (NaN/inf) are recorded in OUT/<run-name>/failed.json and skipped "
            "later unless --retry-failed."
        ),
    )
    p.add_argument(
        "config",
        nargs="+",
        help="training config(s) (YAML); with several, the grid runs for each and run names "
        "start with the config's file name",
    )
    p.add_argument(
        "--grid",
        nargs="+",
        required=True,
        metavar="KEY=V1,V2",
        help="axes of the grid, e.g. alpha=0,0.5,1 seed=0,1,2",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides applied to every run (not part of the run name)",
    )
    p.add_argument("--out", default="runs/sweep", help="sweep directory (runs/sweep)")
    p.add_argument("--eval-data", default=None, help="data spec to evaluate on (default: config's)")
    p.add_argument("--eval-split", default=None, help="split to evaluate on (spec's test split)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate N examples per run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="train again the runs that diverged in an earlier sweep (default: skip them)",
    )
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    _add_generation_args(p)
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from deltakd.eval.sweep import parse_grid, parse_overrides, run_sweep

    _configure_vllm(args)
    grid = parse_grid(args.grid)
    fixed = parse_overrides(args.set)
    results = run_sweep(
        args.config,
        grid,
        out_dir=args.out,
        fixed=fixed,
        eval_data=args.eval_data,
        eval_split=args.eval_split,
        eval_limit=args.eval_limit,
        settings=_settings(args),
        dry_run=args.dry_run,
        retry_failed=args.retry_failed,
    )
    for r in results:
        m = r.get("metrics") or {}
        note = f"ROUGE-1 {100 * m['rouge1']:.2f}" if "rouge1" in m else r.get("error", "")
        print(f"{r['status']:>9}  {r['name']}  {note}")
    failed = [r["name"] for r in results if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} run(s) diverged: {', '.join(failed)} (see <run>/failed.json)")
    if args.json:
        print(json.dumps({"out": args.out, "runs": results}))
    return 0


# ---------------------------------------------------------------- report


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables (mean ± std over seeds) and PNG plots from run directories",
        description=(
            "Group run directories by their config minus the seed and write Markdown + JSON "
            "tables of mean ± std across seeds, plus PNG plots: ROUGE-1 against alpha, training "
            "curves and gradient-norm curves."
        ),
    )
    p.add_argument("runs", nargs="+", help="run directories (or sweep directories holding runs)")
    p.add_argument("--out", default="report", help="where to write report.md/json and PNGs")
    p.add_argument("--no-plots", action="store_true", help="tables only, no PNG plots")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from deltakd.eval.report import build_report

    rep = build_report(args.runs, out_dir=args.out, plots=not args.no_plots)
    print(rep.markdown)
    print(f"wrote {args.out}/report.md, report.json and {len(rep.plots)} plot(s)")
    if args.json:
        print(json.dumps({"out": args.out, "groups": rep.groups, "plots": rep.plots}))
    return 0


# ---------------------------------------------------------------- diagnose


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers, e.g. 0.25,0.5,1"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def _register_diagnose(sub: argparse._SubParsersAction) -> None:
    from deltakd.eval.diagnose import DEFAULT_ALPHAS

    p = sub.add_parser(
        "diagnose",
        help="check the Delta-KD premise on a sample of a config's data and models",
        description=(
            "On a seeded sample of the config's own data and models: KL(π_teacher_ft ‖ π*) per "
            "token at the configured α and others, π*'s entropy, top-1 agreement and mass "
            "outside π_teacher_ft's top-k, the raw models' agreement, the premise check with a "
            "briefly SFT'd student (--student-sft / --sft-steps), the teacher-seed cosine with "
            "teacher_ft2, the teacher's held-out corpus loss ratio, a verdict and a suggested α "
            "range. Definitions: docs/USAGE.md, 'Diagnose before you train'."
        ),
    )
    p.add_argument("config", help="YAML training config")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (as deltakd train)"
    )
    p.add_argument("--rows", type=int, default=32, help="rows sampled (seeded) from the data (32)")
    p.add_argument(
        "--alphas",
        type=_floats,
        default=list(DEFAULT_ALPHAS),
        help="α grid, comma-separated; the configured α is added "
        f"({','.join(f'{a:g}' for a in DEFAULT_ALPHAS)})",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: the config's)")
    p.add_argument("--split", default=None, help="data split (default: validation where it exists)")
    p.add_argument("--seed", type=int, default=0, help="row sampling seed (0)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (4)")
    p.add_argument("--student-sft", default=None, help="a briefly SFT'd student_raw (directory)")
    p.add_argument(
        "--sft-steps",
        type=int,
        default=0,
        help="make the SFT'd student: N steps of method sft on the config's data (temp dir)",
    )
    p.add_argument(
        "--teacher-ft2", default=None, help="a second finetuned teacher (default: config's)"
    )
    p.add_argument(
        "--corpus",
        default=None,
        help="held-out pretraining text: plain text (blank-line separated documents) or JSONL "
        "with a 'text' field (default: the mini world's own)",
    )
    p.add_argument("--corpus-docs", type=int, default=300, help="corpus documents used (300)")
    p.add_argument(
        "--top-k", type=_ints, default=None, help="k of 'mass outside π_ft's top-k' (5 and cache.k)"
    )
    p.add_argument("--kl-bound", type=float, default=0.25, help="α range: KL(π_ft‖π*) bound (0.25)")
    p.add_argument(
        "--top1-drop", type=float, default=0.03, help="α range: allowed top-1 drop (0.03)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="end with one line of JSON: every figure")
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args: argparse.Namespace) -> int:
    from deltakd.errors import ConfigError
    from deltakd.eval.diagnose import DiagnoseOptions, diagnose, format_report, json_line
    from deltakd.train.config import load_config

    config = load_config(args.config, args.overrides)
    top_k = args.top_k
    if top_k is None:
        k = config.cache.k  # None: the cache's default 64; "V": the whole vocabulary, no tail
        top_k = [5] + ([k] if isinstance(k, int) else [64] if k is None else [])
    for name in ("rows", "batch_size", "corpus_docs"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be ≥ 1.")
    if args.sft_steps < 0:
        raise ConfigError(f"--sft-steps {args.sft_steps}: must be ≥ 0.")
    options = DiagnoseOptions(
        rows=args.rows,
        alphas=args.alphas,
        device=args.device,
        seed=args.seed,
        split=args.split,
        batch_size=args.batch_size,
        student_sft=args.student_sft,
        sft_steps=args.sft_steps,
        teacher_ft2=args.teacher_ft2,
        corpus=args.corpus,
        corpus_docs=args.corpus_docs,
        top_k=top_k,
        kl_bound=args.kl_bound,
        top1_drop=args.top1_drop,
        progress=not args.no_progress,
    )
    report = diagnose(config, options)
    print(format_report(report))
    if args.json:
        print(json_line(report))
    return 0
