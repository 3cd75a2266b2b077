"""Run by `test_server_torchrun.py` under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank asks one shared server set (launched by local rank 0, `placement: shared`) for the
Qwen2.5-shaped roles' hidden states, and compares its Delta-KD loss and student gradients
with local references. Mid-run, rank 0 SIGKILLs the teacher_ft server: every rank must notice
and, with `restart: true`, carry on with identical numbers. Writes `rank<N>.json` to argv[2].
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deltakd.losses import delta_kd_loss
from deltakd.references import shm
from deltakd.references.client import ServerReferences, ServerSpec
from deltakd.references.local import LocalReferences
from deltakd.references.role_logits import RoleLogits

ROLES = ("teacher_ft", "teacher_raw", "student_raw")


def main() -> None:
    world_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    paths = {r: str(world_dir / r) for r in ROLES}
    v = 151_665
    student = AutoModelForCausalLM.from_pretrained(paths["student_raw"]).train()
    local = LocalReferences(paths, hidden_states=True)
    specs = [ServerSpec(r, model=paths[r], output="hidden", dtype="fp32") for r in ROLES]
    refs = ServerReferences(specs, placement="shared", restart=True, timeout=20,
                            start_timeout=180, threads=1)  # fmt: skip
    result: dict = {"rank": rank, "run_id": refs.run_id, "steps": []}
    result["server_pids"] = {r: refs.info(r)["pid"] for r in ROLES}
    result["launched"] = {r: refs._conns[r].proc is not None for r in ROLES}

    def batch(k: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(100 * rank + k)
        ids = torch.randint(0, v, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def loss_and_grads(ref_batch, heads, b) -> tuple[float, dict[str, torch.Tensor]]:
        student.zero_grad()
        logits = student(**b).logits[:, :-1, :v]
        rl = RoleLogits(ref_batch, heads, v, torch.device("cpu"))
        mask = b["attention_mask"][:, 1:].bool()
        loss = delta_kd_loss(logits, *(rl.logits(r) for r in ROLES), alpha=1.0, mask=mask)
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in student.named_parameters()}

    steps = 4
    for k in range(steps):
        b = batch(k)
        if k == 2:
            # Kill the shared teacher_ft server while every rank still has work for it.
            dist.barrier()
            if rank == 0:
                proc = refs._conns["teacher_ft"].proc
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            dist.barrier()
        got = refs.fetch(k, b)
        if k + 1 < steps:
            refs.prefetch(k + 1, batch(k + 1))
        loss_s, grads_s = loss_and_grads(got, refs.lm_heads(), b)
        loss_l, grads_l = loss_and_grads(local.fetch(k, b), local.lm_heads(), b)
        worst = max(float((grads_s[n] - grads_l[n]).abs().max()) for n in grads_s)
        result["steps"].append({"loss_servers": loss_s, "loss_local": loss_l, "grad_diff": worst})
    result["restarts"] = {r: refs._conns[r].restarts for r in ROLES}
    result["server_pids_after"] = {r: refs.info(r)["pid"] for r in ROLES}
    dist.barrier()  # every rank is done before local rank 0 stops the shared servers
    refs.close()
    result["segments_left"] = shm.segments(refs.run_id)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
