"""`build_world`: corpus → tokenizer → teacher_raw / student_raw → teacher_ft, teacher_ft2 →
evaluation; `build_role`: one finetuned teacher alone, added to an existing world.

Two worlds: ``v1`` (the original, shipped in assets/mini) and ``v2`` (assets/mini_v2), where the
base models are pretrained on a corpus that already holds worked examples of the tasks, the
teacher's SFT is a gentle, replayed local shift, every head is 32 wide, and a second student of
about twice the first one's size exists (`student_raw_2x`). See docs/RESULTS.md "World v2".

Every step is seeded, so the same seed, scale and library versions rebuild the same world.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltakd.errors import ConfigError

ROLES: tuple[str, ...] = ("teacher_raw", "teacher_ft", "student_raw", "teacher_ft2")
ROLES_V2: tuple[str, ...] = (*ROLES, "student_raw_2x")
WORLDS: tuple[str, ...] = ("v1", "v2")
#: Finetuned roles -> offset of their SFT run's seed (``seed * 100 + offset``). Both start from
#: teacher_raw with the same data and settings; only the seed, hence the data order, differs.
#: teacher_ft2 is the second teacher of the `multi_teacher` parallelogram variant.
SFT_SEED_OFFSETS: dict[str, int] = {"teacher_ft": 3, "teacher_ft2": 4}


@dataclass(frozen=True)
class Scale:
    corpus_docs: int
    vocab_size: int
    teacher_pretrain_steps: int
    teacher_pretrain_lr: float
    student_pretrain_steps: int
    student_pretrain_lr: float
    sft_steps: int
    sft_lr: float
    batch_size: int
    eval_limit: int  # test items per task in the evaluation
    max_new_tokens: int
    train_rows: int | None = None  # train rows per task used for the tokenizer and SFT


SCALES: dict[str, Scale] = {
    # The shipped world. Learning rates shrink with width (Adam moves every weight by about lr
    # per step, so a wider model's function moves further): at equal rates the teacher trailed
    # the 2x narrower student after 250 steps.
    "full": Scale(
        corpus_docs=6000,
        vocab_size=1024,
        teacher_pretrain_steps=500,
        teacher_pretrain_lr=2.5e-3,
        student_pretrain_steps=500,
        student_pretrain_lr=5e-3,
        sft_steps=600,
        sft_lr=2e-3,
        batch_size=16,
        eval_limit=100,
        max_new_tokens=96,
    ),
    # Plumbing only: every stage runs, nothing is learned.
    "quick": Scale(
        corpus_docs=200,
        vocab_size=512,
        teacher_pretrain_steps=2,
        teacher_pretrain_lr=1e-3,
        student_pretrain_steps=2,
        student_pretrain_lr=1e-3,
        sft_steps=2,
        sft_lr=1e-3,
        batch_size=4,
        eval_limit=2,
        max_new_tokens=8,
        train_rows=40,
    ),
}


@dataclass(frozen=True)
class ScaleV2:
    corpus_docs: int  # world v2's pretraining corpus (prose + worked examples + chat share)
    tokenizer_docs: int  # v1's corpus size for the tokenizer: the same texts, the same tokenizer
    vocab_size: int
    teacher_pretrain_steps: int
    teacher_pretrain_lr: float
    student_pretrain_steps: int
    student_pretrain_lr: float
    student_2x_pretrain_lr: float
    sft_steps: int
    sft_lr: float
    sft_replay: float  # pretraining blocks per SFT row mixed into the SFT data
    batch_size: int
    eval_limit: int
    max_new_tokens: int
    chat_share: float = 0.05
    train_rows: int | None = None


SCALES_V2: dict[str, ScaleV2] = {
    "full": ScaleV2(
        corpus_docs=9000,
        tokenizer_docs=6000,
        vocab_size=1024,
        teacher_pretrain_steps=800,
        teacher_pretrain_lr=2.5e-3,
        student_pretrain_steps=800,
        student_pretrain_lr=5e-3,
        student_2x_pretrain_lr=4e-3,
        # a local shift: 4x gentler than v1's SFT, half as long, with corpus replay
        sft_steps=300,
        sft_lr=5e-4,
        sft_replay=1.0,
        batch_size=16,
        eval_limit=100,
        max_new_tokens=96,
    ),
    "quick": ScaleV2(
        corpus_docs=200,
        tokenizer_docs=200,
        vocab_size=512,
        teacher_pretrain_steps=2,
        teacher_pretrain_lr=1e-3,
        student_pretrain_steps=2,
        student_pretrain_lr=1e-3,
        student_2x_pretrain_lr=1e-3,
        sft_steps=2,
        sft_lr=1e-3,
        sft_replay=1.0,
        batch_size=4,
        eval_limit=2,
        max_new_tokens=8,
        train_rows=40,
    ),
}


def _param_count(model: Any) -> int:
    # Tied embeddings are one tensor: count unique parameters.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def evaluate_model(
    model: Any,
    tokenizer: Any,
    rows: list[dict],
    *,
    task: str,
    max_new_tokens: int,
    batch_size: int = 50,
) -> dict[str, float]:
    """Greedy-decode answers to `rows` and score them: mean ROUGE-1/2/L F1 (rouge-score, with
    stemming) against the reference response and, for math, exact match of the final answer."""
    import torch
    from rouge_score import rouge_scorer

    from deltakd.data.mini.tasks import extract_answer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    outputs: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(
                    r["messages"][:1], tokenize=False, add_generation_prompt=True
                )
                for r in batch
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    exact = 0
    for row, out in zip(rows, outputs):
        scores = scorer.score(row["messages"][1]["content"], out)
        for k in totals:
            totals[k] += scores[k].fmeasure
        if task == "math":
            exact += int(extract_answer(out) == row["answer"])
    n = max(1, len(rows))
    result = {k: round(v / n, 4) for k, v in totals.items()}
    if task == "math":
        result["exact_match"] = round(exact / n, 4)
    result["n"] = len(rows)
    return result


def evaluate_world(
    world_dir: str | Path,
    *,
    limit: int = 100,
    max_new_tokens: int = 96,
    models: dict[str, Any] | None = None,
    roles: tuple[str, ...] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Score the models of a built world on the first `limit` test rows of each task and
    record the scores in its world.json (``test_scores`` and a description in ``eval``).

    `roles` defaults to every role the world holds; scores of roles not evaluated are kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakd.data.mini.models import corpus_loss
    from deltakd.data.mini.tasks import MINI_TASKS, load_task

    world = Path(world_dir)
    info = json.loads((world / "world.json").read_text())
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    heldout = heldout_corpus(info, n_docs=max(20, 3 * limit))
    scores: dict[str, dict[str, dict[str, float]]] = dict(info.get("test_scores", {}))
    losses: dict[str, float] = dict(info.get("heldout_corpus_loss", {}))
    if roles is None:
        roles = tuple(r for r in ROLES_V2 if (world / r).is_dir())
    for role in roles:
        model = (models or {}).get(role) or AutoModelForCausalLM.from_pretrained(world / role)
        model.eval()
        losses[role] = round(corpus_loss(model, tok, heldout), 4)
        scores[role] = {
            task: evaluate_model(
                model,
                tok,
                load_task(task, "test", seed=info["seed"], limit=limit),
                task=task,
                max_new_tokens=max_new_tokens,
            )
            for task in MINI_TASKS
        }
    info["test_scores"] = scores
    # how well each model knows the world in plain prose: fresh documents, same facts
    info["heldout_corpus_loss"] = losses
    info["eval"] = (
        f"greedy decoding via model.generate on the first {limit} test rows per task "
        f"(max_new_tokens={max_new_tokens}); ROUGE F1 from rouge_score with stemming; "
        "exact_match compares extract_answer() of the output with the reference answer"
    )
    (world / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    return scores


def heldout_corpus(info: dict, n_docs: int) -> list[str]:
    """Fresh documents from the pretraining distribution of the world `info` (its world.json)
    describes: the same facts in new phrasings, orders and sums, never trained on."""
    from deltakd.data.mini.corpus import make_corpus, make_corpus_v2

    if info.get("world", "v1") == "v2":
        return make_corpus_v2(
            info["seed"], n_docs, stream="heldout", chat_share=info["build"]["chat_share"]
        )
    return make_corpus(info["seed"], n_docs=n_docs, stream="heldout")


def _train_world_tokenizer(
    corpus: list[str], train_rows: dict[str, list[dict]], out: Path, vocab_size: int
) -> Any:
    """The BPE tokenizer of a world: trained on the corpus and the train rows' turns."""
    from deltakd.data.mini.tokenizer import train_tokenizer

    texts = list(corpus)
    for rows in train_rows.values():
        for r in rows:
            texts.extend(f"{m['role']}\n{m['content']}" for m in r["messages"])
    return train_tokenizer(texts, out, vocab_size=vocab_size)


def build_world(
    out_dir: str | Path, *, seed: int = 0, scale: str = "full", world: str = "v1"
) -> Path:
    """Build the whole mini world into `out_dir` and return it.

    Writes ``tokenizer/``, ``teacher_raw/``, ``teacher_ft/``, ``teacher_ft2/``,
    ``student_raw/`` (each model directory also holds the tokenizer, so it loads alone) and ``world.json`` with the seed,
    the build settings, parameter counts, training losses and test scores.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm

    from deltakd.data.mini import models as M
    from deltakd.data.mini.corpus import make_corpus
    from deltakd.data.mini.tasks import MINI_TASKS, SPLIT_SIZES, load_task

    if world not in WORLDS:
        raise ConfigError(
            f"unknown mini world {world!r}; use one of {', '.join(WORLDS)} "
            "(v1: the original world, v2: base models that already know the tasks)"
        )
    if scale not in SCALES:
        raise ConfigError(
            f"unknown mini-world scale {scale!r}; use one of {', '.join(SCALES)} "
            "(full: the shipped world, quick: a plumbing check)"
        )
    if world == "v2":
        return _build_v2(Path(out_dir), seed=seed, scale=scale)
    s = SCALES[scale]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    stages = tqdm(total=7, desc="mini world", unit="stage")

    def stage(name: str) -> None:
        stages.set_postfix_str(name)

    # 1. data and tokenizer
    stage("corpus + tokenizer")
    corpus = make_corpus(seed, n_docs=s.corpus_docs)
    train_rows = {t: load_task(t, "train", seed=seed, limit=s.train_rows) for t in MINI_TASKS}
    tok = _train_world_tokenizer(corpus, train_rows, out / "tokenizer", s.vocab_size)
    timings["tokenizer"] = time.perf_counter() - t0
    stages.update()

    with tempfile.TemporaryDirectory(prefix="deltakd-mini-") as work:
        work_dir = Path(work)
        pretrain = M.pack_corpus(corpus, tok)

        def save(model: Any, role: str) -> None:
            shutil.rmtree(out / role, ignore_errors=True)
            model.save_pretrained(out / role)
            tok.save_pretrained(out / role)

        # 2-3. pretraining
        models: dict[str, Any] = {}
        for role, shape, steps, lr, model_seed in (
            (
                "teacher_raw",
                M.TEACHER,
                s.teacher_pretrain_steps,
                s.teacher_pretrain_lr,
                seed * 100 + 1,
            ),
            (
                "student_raw",
                M.STUDENT,
                s.student_pretrain_steps,
                s.student_pretrain_lr,
                seed * 100 + 2,
            ),
        ):
            stage(f"pretrain {role}")
            t = time.perf_counter()
            model = M.make_model(shape, tok, seed=model_seed)
            settings = M.TrainSettings(max_steps=steps, batch_size=s.batch_size, learning_rate=lr)
            losses[role] = M.train(
                model, pretrain, tok, settings, seed=model_seed, work_dir=work_dir / role
            )
            save(model, role)
            models[role] = model
            timings[role] = time.perf_counter() - t
            stages.update()

        # 4. supervised finetuning of the teacher on both tasks, assistant tokens only, twice
        # (teacher_ft2: another seed, so another data order)
        for role in SFT_SEED_OFFSETS:
            stage(f"finetune {role}")
            t = time.perf_counter()
            models[role], losses[role] = _finetune(out, role, tok, train_rows, s, seed, work_dir)
            save(models[role], role)
            timings[role] = time.perf_counter() - t
            stages.update()

    # 5. world.json, then 6. evaluation on the test splits (recorded in world.json)
    stage("evaluate")
    info = {
        "seed": seed,
        "scale": scale,
        "vocab_size": len(tok),
        "parameters": {role: _param_count(models[role]) for role in ROLES},
        "shapes": {
            role: asdict(M.STUDENT if role == "student_raw" else M.TEACHER) for role in ROLES
        },
        "build": asdict(s),
        "sft_seeds": {role: seed * 100 + k for role, k in SFT_SEED_OFFSETS.items()},
        "split_sizes": dict(SPLIT_SIZES),
        "train_loss": {k: round(v, 4) for k, v in losses.items()},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        # float reductions depend on the thread count, so a bit-identical rebuild needs this too
        "torch_threads": torch.get_num_threads(),
    }
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    stages.update()
    t = time.perf_counter()
    evaluate_world(out, limit=s.eval_limit, max_new_tokens=s.max_new_tokens, models=models)
    info = json.loads((out / "world.json").read_text())
    info["seconds"]["evaluate"] = round(time.perf_counter() - t, 1)
    info["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    stages.update()
    stages.close()
    return out


def _finetune(
    world: Path,
    role: str,
    tok: Any,
    train_rows: dict[str, list[dict]],
    s: Scale | ScaleV2,
    seed: int,
    work_dir: Path,
    replay: Any = None,
) -> tuple[Any, float]:
    """SFT of ``world/teacher_raw`` on both tasks' train rows (assistant tokens only) with the
    seed of `role`; returns the model and its final training loss.

    `replay` (world v2): packed pretraining blocks mixed in, ``s.sft_replay`` of them per SFT
    row (cycled if there are fewer), so the finetune keeps the base model's language."""
    import transformers
    from datasets import concatenate_datasets

    from deltakd.data.mini import models as M
    from deltakd.data.mini.tasks import MINI_TASKS

    sft = M.chat_dataset([r for t in MINI_TASKS for r in train_rows[t]], tok)
    if replay is not None:
        n = round(s.sft_replay * len(sft))
        sft = concatenate_datasets([sft, replay.select([i % len(replay) for i in range(n)])])
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "teacher_raw")
    settings = M.TrainSettings(
        max_steps=s.sft_steps, batch_size=s.batch_size, learning_rate=s.sft_lr
    )
    sft_seed = seed * 100 + SFT_SEED_OFFSETS[role]
    loss = M.train(model, sft, tok, settings, seed=sft_seed, work_dir=work_dir / f"sft-{role}")
    return model, loss


def _build_v2(out: Path, *, seed: int, scale: str) -> Path:
    """World v2 (see the module docstring): v1's tokenizer, base models pretrained on
    `make_corpus_v2`, gentle replayed SFT, and student_raw_2x."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    from deltakd.data.mini import models as M
    from deltakd.data.mini.corpus import make_corpus, make_corpus_v2
    from deltakd.data.mini.tasks import MINI_TASKS, SPLIT_SIZES, load_task

    s = SCALES_V2[scale]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    stages = tqdm(total=len(ROLES_V2) + 2, desc="mini world v2", unit="stage")

    # 1. v1's tokenizer, trained on exactly v1's texts: the two worlds share token ids
    stages.set_postfix_str("corpus + tokenizer")
    train_rows = {t: load_task(t, "train", seed=seed, limit=s.train_rows) for t in MINI_TASKS}
    v1_corpus = make_corpus(seed, n_docs=s.tokenizer_docs)
    tok = _train_world_tokenizer(v1_corpus, train_rows, out / "tokenizer", s.vocab_size)
    corpus = make_corpus_v2(seed, n_docs=s.corpus_docs, chat_share=s.chat_share)
    pretrain = M.pack_corpus(corpus, tok)
    timings["tokenizer"] = time.perf_counter() - t0
    stages.update()

    shapes = {
        "teacher_raw": M.TEACHER_V2,
        "student_raw": M.STUDENT_V2,
        "student_raw_2x": M.STUDENT_2X_V2,
        "teacher_ft": M.TEACHER_V2,
        "teacher_ft2": M.TEACHER_V2,
    }
    models: dict[str, Any] = {}

    def save(model: Any, role: str) -> None:
        shutil.rmtree(out / role, ignore_errors=True)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)

    with tempfile.TemporaryDirectory(prefix="deltakd-mini-v2-") as work:
        work_dir = Path(work)
        # 2. pretraining on the shared corpus, each model with its own seed
        for role, steps, lr, model_seed in (
            ("teacher_raw", s.teacher_pretrain_steps, s.teacher_pretrain_lr, seed * 100 + 1),
            ("student_raw", s.student_pretrain_steps, s.student_pretrain_lr, seed * 100 + 2),
            ("student_raw_2x", s.student_pretrain_steps, s.student_2x_pretrain_lr, seed * 100 + 5),
        ):
            stages.set_postfix_str(f"pretrain {role}")
            t = time.perf_counter()
            model = M.make_model(shapes[role], tok, seed=model_seed)
            settings = M.TrainSettings(max_steps=steps, batch_size=s.batch_size, learning_rate=lr)
            losses[role] = M.train(
                model, pretrain, tok, settings, seed=model_seed, work_dir=work_dir / role
            )
            save(model, role)
            models[role] = model
            timings[role] = time.perf_counter() - t
            stages.update()

        # 3. the teacher's SFT, twice (teacher_ft2: another seed, so another data order)
        for role in SFT_SEED_OFFSETS:
            stages.set_postfix_str(f"finetune {role}")
            t = time.perf_counter()
            models[role], losses[role] = _finetune(
                out, role, tok, train_rows, s, seed, work_dir, replay=pretrain
            )
            save(models[role], role)
            timings[role] = time.perf_counter() - t
            stages.update()

    stages.set_postfix_str("evaluate")
    info = {
        "world": "v2",
        "seed": seed,
        "scale": scale,
        "vocab_size": len(tok),
        "parameters": {role: _param_count(models[role]) for role in ROLES_V2},
        "shapes": {role: asdict(shapes[role]) for role in ROLES_V2},
        "build": asdict(s),
        "sft_seeds": {role: seed * 100 + k for role, k in SFT_SEED_OFFSETS.items()},
        "split_sizes": dict(SPLIT_SIZES),
        "train_loss": {k: round(v, 4) for k, v in losses.items()},
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "torch_threads": torch.get_num_threads(),
    }
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    t = time.perf_counter()
    evaluate_world(out, limit=s.eval_limit, max_new_tokens=s.max_new_tokens, models=models)
    info = json.loads((out / "world.json").read_text())
    info["seconds"]["evaluate"] = round(time.perf_counter() - t, 1)
    info["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    stages.update()
    stages.close()
    return out


def build_role(world_dir: str | Path, role: str = "teacher_ft2") -> Path:
    """(Re)build one finetuned teacher of an existing world and evaluate it, touching nothing
    else: the other models' files stay byte for byte, and world.json only gains the role's
    entries. Seed and settings come from the world's own world.json, so the result is the model
    `build_world` makes for that role."""
    import torch
    from transformers import AutoTokenizer

    from deltakd.data.mini.tasks import MINI_TASKS, load_task

    if role not in SFT_SEED_OFFSETS:
        raise ConfigError(
            f"cannot build {role!r} alone; use one of {', '.join(SFT_SEED_OFFSETS)} "
            "(rebuild the whole world for the others)"
        )
    world = Path(world_dir)
    info_path = world / "world.json"
    if not info_path.is_file() or not (world / "teacher_raw").is_dir():
        raise ConfigError(
            f"{world} is not a built mini world (no world.json or teacher_raw/); build the whole "
            f"world first with `deltakd mini build --out {world}`"
        )
    info = json.loads(info_path.read_text())
    v2 = info.get("world", "v1") == "v2"
    s: Scale | ScaleV2 = (ScaleV2 if v2 else Scale)(**info["build"])
    seed = int(info["seed"])
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    train_rows = {t: load_task(t, "train", seed=seed, limit=s.train_rows) for t in MINI_TASKS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltakd-mini-") as work:
        replay = None
        if isinstance(s, ScaleV2):
            from deltakd.data.mini.corpus import make_corpus_v2
            from deltakd.data.mini.models import pack_corpus

            corpus = make_corpus_v2(seed, n_docs=s.corpus_docs, chat_share=s.chat_share)
            replay = pack_corpus(corpus, tok)
        model, loss = _finetune(world, role, tok, train_rows, s, seed, Path(work), replay)
    shutil.rmtree(world / role, ignore_errors=True)
    model.save_pretrained(world / role)
    # The tokenizer's own files, not tok.save_pretrained: a tokenizer loaded from disk saves
    # extra loader keys, and every role's copy should be the same bytes.
    for f in (world / "tokenizer").iterdir():
        shutil.copy2(f, world / role / f.name)
    seconds = time.perf_counter() - t0
    info["parameters"][role] = _param_count(model)
    info["shapes"][role] = info["shapes"]["teacher_ft"]
    info["sft_seeds"] = {
        r: seed * 100 + k for r, k in SFT_SEED_OFFSETS.items() if (world / r).is_dir()
    }
    info["train_loss"][role] = round(loss, 4)
    info["seconds"][role] = round(seconds, 1)
    info.setdefault("torch_threads_by_role", {})[role] = torch.get_num_threads()
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    evaluate_world(
        world,
        limit=s.eval_limit,
        max_new_tokens=s.max_new_tokens,
        models={role: model},
        roles=(role,),
    )
    return world
