"""jobs/reward.py end to end through the Ray Train + DeepSpeed runner (tiny encoder)."""
import json
import sys
from pathlib import Path

import pytest

from raypref.experiments.reward import RewardJobConfig, run_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.reward import main  # noqa: E402  (the entry point, flags and all)

SMALL = ["--encoder.name_or_path", "tiny", "--encoder.tiny_hidden", "16",
         "--encoder.tiny_layers", "1", "--vae.pair_hidden", "16", "--vae.pair_out", "16",
         "--vae.latent", "8", "--vae.decoder_hidden", "16", "--vae.attention_heads", "2",
         "--data.train_pairs_per_user", "30", "--data.test_pairs_per_user", "6",
         "--data.demo_pool", "12", "--data.n_demos", "4", "--eval_pairs_per_user", "6",
         "--training.steps", "4", "--training.micro_batch_size", "8",
         "--resources.checkpoint_every", "2", "--resources.eval_every", "2"]


def test_run_name_ignores_restart_so_a_restart_replaces_the_run_it_names():
    cfg = RewardJobConfig(method="vae")
    assert run_name(cfg).startswith("reward-vae-")
    assert run_name(RewardJobConfig(method="vae", restart=True)) == run_name(cfg)
    assert run_name(RewardJobConfig(method="vae", seed=1)) != run_name(cfg)


def test_restart_reaches_the_runner(tmp_path, monkeypatch):
    from raypref.train import runner

    seen = {}

    class Stop(Exception):
        pass

    def fake_run(spec, cfg, **kwargs):  # stands in for Ray Train: only the call is checked here
        seen.update(storage=cfg.storage_path, **kwargs)
        raise Stop

    monkeypatch.setattr(runner, "run", fake_run)
    for restart in ("true", "false"):
        with pytest.raises(Stop):
            main(["--method", "bt", "--restart", restart, "--output_dir", str(tmp_path), *SMALL])
        assert seen["restart"] is (restart == "true")
        assert Path(seen["storage"]).parent.name.startswith("reward-bt-")


@pytest.mark.slow
def test_reward_job_vae_adaptive_through_the_runner(ray_local, tmp_path, capsys):
    result = main(["--method", "vae", "--sampling", "adaptive", "--output_dir", str(tmp_path), *SMALL])
    final = result.summary["final"]
    assert {"acc.user1", "acc.user2", "acc.mean", "acc.min"} <= set(final)
    assert all(0.0 <= v <= 1.0 for v in final.values())
    cached = list((tmp_path / "cache").glob("demos-*.safetensors"))
    assert len(cached) == 1  # demonstration pools embedded once, before training
    assert result.output_dir.parent == tmp_path and result.output_dir.name.startswith("reward-vae-")
    export = result.policy_dir
    assert (export / "model.safetensors").exists()
    assert json.loads((export / "reward_config.json").read_text())["sampling"] == "adaptive"
    assert (result.output_dir / "user-accuracy.png").exists() and (result.output_dir / "latent-tsne.png").exists()
    assert json.loads((result.output_dir / "summary.json").read_text())["final"] == final
    assert (export / "latent_means.safetensors").exists()
    # the world judge's own accuracy on the same pairs, printed beside the model's
    assert "[reward] reference: the judges with each user's true weights" in capsys.readouterr().out
