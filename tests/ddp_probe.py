"""``fairseq-train``, recording per process what ``test_distributed.py`` checks (run under torchrun or alone).

Writes ``$IMITKD_PROBE_DIR/rank<R>.json``: how many times the teacher was loaded, and for every update the
sample ids and source rows of this rank's batches, the source rows it rolled out, the β it used, each
micro-batch's raw loss and sample size, and a hash of the student's parameters after the update. The
student's parameters after the first update go to ``rank<R>_update1.pt``. Everything else is the real
``fairseq_cli.train.cli_main`` with the command line given.
"""
import hashlib
import json
import os
import sys


def main() -> None:
    import torch
    from fairseq.trainer import Trainer
    from fairseq_cli import train

    from fairseq_imitkd.criterions import imitkd
    from fairseq_imitkd.tasks import distillation

    out_dir = os.environ["IMITKD_PROBE_DIR"]
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "teacher_loads": 0, "updates": []}
    current = {"ids": [], "sources": [], "rolled": [], "micro": [], "beta": []}

    load_teacher = distillation.load_teacher

    def counted_load_teacher(*args, **kwargs):
        record["teacher_loads"] += 1
        return load_teacher(*args, **kwargs)

    rollout = imitkd.rollout

    def recorded_rollout(model, src_tokens, src_lengths, **kwargs):
        current["rolled"] += src_tokens.tolist()
        return rollout(model, src_tokens, src_lengths, **kwargs)

    task_step = distillation.DistillationTask.train_step

    def recorded_task_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, size, log = task_step(self, sample, model, criterion, optimizer, update_num, ignore_grad)
        if not ignore_grad:
            current["ids"] += sample["id"].tolist()
            current["sources"] += sample["net_input"]["src_tokens"].tolist()
            current["micro"].append([float(loss), float(size)])
            if "beta_x_sents" in log:
                current["beta"].append(log["beta_x_sents"] / log["nsentences"])
        return loss, size, log

    trainer_step = Trainer.train_step

    def recorded_trainer_step(self, samples, raise_oom=False):
        out = trainer_step(self, samples, raise_oom)
        params = [p.detach().clone() for p in self.model.parameters()]
        flat = torch.cat([p.reshape(-1) for p in params])
        update = self.get_num_updates()
        record["updates"].append({**{k: list(v) for k, v in current.items()}, "update": update,
                                  "params_sha": hashlib.sha256(flat.numpy().tobytes()).hexdigest()})
        for value in current.values():
            value.clear()
        if update == 1:
            torch.save(params, os.path.join(out_dir, f"rank{rank}_update1.pt"))
        return out

    distillation.load_teacher = counted_load_teacher
    imitkd.rollout = recorded_rollout
    distillation.DistillationTask.train_step = recorded_task_step
    Trainer.train_step = recorded_trainer_step
    sys.argv = ["fairseq-train"] + sys.argv[1:]
    try:
        train.cli_main()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
