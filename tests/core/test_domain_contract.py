"""The domain contract, the registry, the rewards and the shipped toy base."""

import pytest
import torch

from flowcoach.core.checkpoint import load_base
from flowcoach.core.domain import check_domain, get_domain
from flowcoach.core.registry import DOMAINS, FlowcoachError, Registry
from flowcoach.core.trainer import evaluate_model
from flowcoach.domains.toy import ToyDomain
from flowcoach.rewards import build_reward, parse_reward_spec
from flowcoach.rewards.toy import mode_centres, mode_reward


@pytest.mark.parametrize("name", DOMAINS.names())
def test_every_registered_domain_conforms(name):
    assert len(check_domain(get_domain(name))) >= 10


def test_registry_rules():
    reg = Registry("thing")
    reg.register("my_thing", 1)
    assert reg.get("my-thing") == 1 and reg.get("MY_THING") == 1
    with pytest.raises(FlowcoachError, match="already registered"):
        reg.register("my-thing", 2)
    with pytest.raises(FlowcoachError, match="choose one of: my-thing"):
        reg.get("other")
    assert reg.get("flowcoach.rewards.toy:mode_reward") is mode_reward
    reg.register("lazy", "flowcoach.rewards.toy:mode_centres")
    assert reg.get("lazy") is mode_centres


def test_importing_core_does_not_import_domain_libraries():
    import subprocess
    import sys

    code = "import sys, flowcoach.core, flowcoach.core.trainer; print(sorted(m for m in ('rdkit','pymatgen','mujoco','torchaudio','diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_toy_reward_peaks_at_the_target_mode_and_counts_invalid():
    centres = mode_centres()
    objects = [centres[0].numpy(), centres[1].numpy(), (centres[0] + 0.5).numpy(), torch.tensor([float("nan"), 0.0]).numpy()]
    scores, info = mode_reward(objects, torch.zeros(4, dtype=torch.long))
    assert scores[0] == 1.0 and scores[1] < 0.01 and 0 < scores[2] < 1 and scores[3] == 0.0
    assert info["invalid"] == 1


def test_composite_reward_weights_and_reports_components():
    reward = build_reward(["toy-mode=2", "toy-on-manifold=0.5"])
    objects = [mode_centres()[0].numpy(), mode_centres()[3].numpy()]
    total, info = reward(objects, torch.tensor([0, 0]))
    torch.testing.assert_close(total, info["components"] @ torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(info["components"][:, 1], torch.ones(2))
    assert parse_reward_spec(("a",)) == {"a": 1.0}
    with pytest.raises(FlowcoachError, match="not a number"):
        parse_reward_spec(("a=x",))


def test_shipped_toy_base_meets_its_recorded_figures():
    domain = ToyDomain()
    model, record = load_base(domain)
    ev = record["eval"]
    metrics, _, _ = evaluate_model(model, domain, ev["num_samples"], ev["num_steps"], seed=ev["seed"])
    for key, recorded in ev["metrics"].items():
        assert abs(metrics[key] - recorded) < 0.01, (key, metrics[key], recorded)
    # and it is a real base: samples on the data, every mode covered, ~1/8 on the target
    assert metrics["on_manifold_rate"] > 0.9 and metrics["modes_covered"] == 8
    assert 0.05 < metrics["target_hit_rate"] < 0.25


def test_wrong_domain_base_is_refused(tmp_path):
    from flowcoach.core.checkpoint import save_base

    class Other(ToyDomain):
        name = "other"

    model = ToyDomain().build_model(**ToyDomain().model_config())
    save_base(model, "other", ToyDomain().model_config(), {}, tmp_path / "b")
    with pytest.raises(FlowcoachError, match="is for domain 'other', not 'toy'"):
        load_base(ToyDomain(), tmp_path / "b")
