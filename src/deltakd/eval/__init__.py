"""Evaluation: ROUGE / exact match of generated replies, sweeps and reports.

Public API (modules import torch only inside functions, so importing them is cheap)::

    from deltakd.eval.evaluate import evaluate, evaluate_spec, EvalResult, load_eval_rows
    from deltakd.generation import generate, GenerationSettings   # below eval and train
    from deltakd.eval.metrics import rouge_scores, exact_match
    from deltakd.eval.sweep import run_sweep
    from deltakd.eval.report import build_report

    result = evaluate("runs/x/final", None, rows, settings=GenerationSettings(max_new_tokens=64))
    result.metrics()  # {"rouge1", "rouge2", "rougeL", "exact_match", "n"}

Import the functions from their modules: `deltakd.eval.evaluate` is a module name, so
`from deltakd.eval import evaluate` would give the module.
"""
