"""Two-process CPU data parallelism (gloo, started by torchrun) must end with the prompt a single process learns,
for every registered learner: CoOp (text side only, cached image features), MaPLe (the image tower runs, with
gradients to its couplings, at every step), and the others."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from cmp_hf.learners import LEARNERS

SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    from cmp_hf import CMPConfig, CMPTrainer
    from cmp_hf.learners import LEARNERS
    from cmp_hf.testing.synthetic import colour_patches

    clip_dir, output_dir, per_device, learner = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    data = colour_patches(["red", "green", "blue", "yellow"], per_class=8, seed=5)  # 32 rows: 4 steps of 8
    config = CMPConfig(
        output_dir=output_dir, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=per_device, max_steps=4, n_ctx=4, learning_rate=0.05, seed=3,
        cmp_lambda=1.0, logging_steps=2, dataloader_drop_last=True, prompt_learner=learner,
        **LEARNERS[learner].test_options,
    )
    trainer = CMPTrainer(model=clip_dir, args=config, train_dataset=data)
    def learned():
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    initial = learned()
    trainer.train()
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        logged = [e for e in trainer.state.log_history if "loss" in e]
        print("LOGGED", [(round(e["ce"], 6), round(e["cmp"], 6)) for e in logged])
        print("MOVED", max((p - initial[n]).abs().max().item() for n, p in learned().items()))  # the largest update
    native_threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    before = native_threads()
    trainer.end_training()  # the process group destroyed before exit, as the recipe does
    with open(f"{output_dir}.threads-{trainer.args.process_index}", "w") as f:  # a file each: the ranks share stdout
        f.write(f"{before} {native_threads()}")
    """
)


def run(command, env=None):
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def learned_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor the run saved: the peft context and the learner's own (MaPLe's deep prompts and couplings)."""
    return {f"{file.name}/{key}": value for file in sorted(directory.glob("*.safetensors"))
            for key, value in load_file(file).items()}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_two_process_ddp_matches_one_process(tmp_path, tiny_clip_dir, learner):
    port = 29533 + sorted(LEARNERS).index(learner)
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single_log = run([sys.executable, str(script), tiny_clip_dir, str(tmp_path / "single"), "8", learner], env)
    ddp_log = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), tiny_clip_dir, str(tmp_path / "ddp"), "4", learner],
        env,
    )  # fmt: skip
    single, ddp = learned_tensors(tmp_path / "single"), learned_tensors(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    assert (len(single) == 1) == (LEARNERS[learner].weights_name is None)  # MaPLe, ...: their own tensors too
    gap = max((single[key] - ddp[key]).abs().max().item() for key in single)
    moved = float(single_log.split("MOVED")[1].split()[0])
    print(f"DDP ({learner}): update {moved:.3e}, |1 process x batch 8 - 2 processes x batch 4| = {gap:.3e}")
    # unclipped (CMPConfig's default, as CoOp): a wrong gradient scale would show as a gap of the update's order
    assert moved > 1e-3 and gap <= 1e-5 * moved
    # The logged loss terms are averaged over both processes, so they match the single-process run; the
    # falling cross-entropy shows that the compared prompts did train.
    single_terms = ast.literal_eval(single_log.split("LOGGED")[1].split("MOVED")[0].strip())
    ddp_terms = ast.literal_eval(ddp_log.split("LOGGED")[1].split("MOVED")[0].strip())
    torch.testing.assert_close(torch.tensor(ddp_terms), torch.tensor(single_terms), atol=1e-5, rtol=0)
    assert single_terms[-1][0] < single_terms[0][0]
    # end_training destroyed the gloo group on both processes (its worker threads gone), not interpreter shutdown,
    # where a worker finishing a collective's clean-up could abort a finished run (exit -6, 1 run in ~10 here)
    threads = {rank: tuple(map(int, (tmp_path / f"ddp.threads-{rank}").read_text().split())) for rank in (0, 1)}
    assert all(after < before for before, after in threads.values()), threads


EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from cmp_hf import CMPConfig, CMPTrainer, PromptConfig, PromptTunedCLIP
    from cmp_hf.testing.synthetic import random_features
    from cmp_hf.testing.tiny import tiny_clip

    names = [f"class {chr(97 + k)}" for k in range(7)]
    clip, processor = tiny_clip(word for name in names for word in name.split())
    torch.manual_seed(0)  # the same random context on every process (and in both runs)
    model = PromptTunedCLIP.from_clip(clip, processor.tokenizer, PromptConfig(class_names=names, n_ctx=2))
    dataset = random_features(61, clip.config.projection_dim, len(names))
    config = CMPConfig(
        output_dir=sys.argv[1], use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_eval_batch_size=int(sys.argv[2]),
    )
    trainer = CMPTrainer(model, config, processing_class=processor)
    metrics = trainer.evaluate({"set": dataset})
    if trainer.is_world_process_zero():
        print("METRICS", json.dumps({k: v for k, v in metrics.items() if not k.endswith(("per_second", "time"))}))
    trainer.end_training()
    """
)


@pytest.mark.slow
def test_two_process_evaluation_gives_the_single_process_numbers(tmp_path):
    """61 rows in batches of 8 over 2 processes: the last round is padded with repeated rows, which the metrics,
    the eval loss and the loss terms must not count."""
    script = tmp_path / "evaluate_ddp.py"
    script.write_text(EVAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = run([sys.executable, str(script), str(tmp_path / "single"), "8"], env)
    ddp = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29599",
         str(script), str(tmp_path / "ddp"), "8"],
        env,
    )  # fmt: skip
    single, ddp = (json.loads(log.split("METRICS")[1].strip().splitlines()[0]) for log in (single, ddp))
    assert "eval_set_ece_pct" in single and single.keys() == ddp.keys()
    assert ddp == pytest.approx(single, abs=1e-5)
