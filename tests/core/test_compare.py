"""`flowcoach compare` on the toy domain: intervals, the report's sections, and the HTML in Chromium."""

import json
import subprocess
import wave
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from flowcoach.core.algorithms import algorithm_defaults
from flowcoach.core.checkpoint import load_base
from flowcoach.core.cli import main
from flowcoach.core.compare import (MIN_REPLICATES, Entry, bootstrap_indices, compare, domain_settings,
                                    evaluate_entry, paired_difference, parse_cif, parse_spec, percentile_interval,
                                    plot_structures, resampled_means, sample_files)
from flowcoach.core.registry import FlowcoachError
from flowcoach.core.trainer import evaluate_model, train
from flowcoach.domains.toy import ToyDomain

CHROMIUM = Path("/usr/bin/chromium")
METRICS = ("target_hit_rate", "on_manifold_rate", "modes_covered", "mean_distance_to_target", "invalid_rate",
           "reward_mean")


def toy_result(n: int, domain=None, bootstrap: int = 200, seed: int = 12345):
    domain = domain or ToyDomain()
    settings = domain_settings(domain, n, 20, None, seed)
    indices = bootstrap_indices(n, bootstrap, seed)
    return evaluate_entry(load_base(domain)[0], domain, Entry("toy", "base", "base"), settings, indices, 600.0)


# ----------------------------------------------------------------------------- intervals
def test_percentile_interval_is_honest():
    reps = np.linspace(0.0, 1.0, 1001)
    iv = percentile_interval(0.5, reps, "per-sample bootstrap")
    assert iv.lo == pytest.approx(0.025) and iv.hi == pytest.approx(0.975) and iv.replicates == 1001
    # a full-set value the resamples do not bracket (a metric of distinct samples) gets no interval
    missed = percentile_interval(1.0, reps * 0.6, "re-evaluated bootstrap")
    assert missed.lo is None and missed.method == "n/a" and "distinct samples" in missed.note
    few = percentile_interval(0.5, reps[:MIN_REPLICATES - 1], "re-evaluated bootstrap")
    assert few.lo is None and "--bootstrap-seconds" in few.note
    sparse = percentile_interval(0.5, np.where(np.arange(1001) % 50 == 0, reps, np.nan), "re-evaluated bootstrap")
    assert sparse.lo is None and "only 21 of 1001 resamples give a finite value" in sparse.note
    assert percentile_interval(2.0, None, "fixed").method == "fixed"


def test_resampled_means_skip_non_finite_values():
    values = np.array([1.0, np.nan, 3.0])
    idx = np.array([[0, 1, 2], [1, 1, 1], [2, 2, 0]])
    out = resampled_means(values, idx)
    assert out[0] == 2.0 and np.isnan(out[1]) and out[2] == pytest.approx(7 / 3)


def test_point_estimates_are_flowcoach_evals_and_intervals_contain_them():
    domain = ToyDomain()
    r = toy_result(256, domain)
    expected, _, _ = evaluate_model(load_base(domain)[0], domain, 256, 20, seed=12345)
    assert r.metrics == expected
    for key in METRICS:
        iv = r.intervals[key]
        assert iv.lo is not None, (key, iv)
        assert iv.lo <= iv.value <= iv.hi, (key, iv)
    assert r.intervals["reward_mean"].method == "per-sample bootstrap"
    assert r.intervals["target_hit_rate"].method == "re-evaluated bootstrap"
    assert r.intervals["target_hit_rate"].hi - r.intervals["target_hit_rate"].lo > 0.02  # real spread, not [v, v]


def test_intervals_shrink_with_n():
    small, large = toy_result(64), toy_result(1024)
    for key in ("target_hit_rate", "on_manifold_rate", "mean_distance_to_target", "reward_mean"):
        w_small = small.intervals[key].hi - small.intervals[key].lo
        w_large = large.intervals[key].hi - large.intervals[key].lo
        assert 0 < w_large < 0.6 * w_small, (key, w_small, w_large)  # ~1/4 expected: width ~ 1/sqrt(n)


def test_same_seed_same_intervals_and_a_model_minus_itself_is_exactly_zero():
    a, b = toy_result(128), toy_result(128)
    assert {k: v.as_dict() for k, v in a.intervals.items()} == {k: v.as_dict() for k, v in b.intervals.items()}
    for key, iv in paired_difference(a, b).items():
        assert (iv.value, iv.lo, iv.hi) == (0.0, 0.0, 0.0), key


class ToyWithSampleHook(ToyDomain):
    """The optional per-sample hook: the hit rate as the mean of per-sample hits."""

    def evaluate_samples(self, objects, conditions):
        from flowcoach.rewards.toy import MODE_STD, mode_centres
        import torch

        x = torch.as_tensor(np.stack(objects)).float()
        d = torch.cdist(x, mode_centres())
        hit = (d.argmin(1) == torch.as_tensor(conditions).long()) & (d.min(1).values < 3 * MODE_STD)
        return {"target_hit_rate": hit.float().numpy()}


class ToyWithWrongHook(ToyDomain):
    def evaluate_samples(self, objects, conditions):
        return {"target_hit_rate": np.ones(len(objects))}


class ToyWithUniqueness(ToyDomain):
    """A metric of distinct samples: every ODE sample is distinct, every resample holds duplicates."""

    def evaluate(self, objects, conditions):
        rows = {tuple(np.round(o, 6)) for o in objects}
        return {**super().evaluate(objects, conditions), "uniqueness": len(rows) / len(objects)}


def test_per_sample_hook_gives_the_same_interval_without_re_evaluating():
    hooked, plain = toy_result(256, ToyWithSampleHook()), toy_result(256)
    h, p = hooked.intervals["target_hit_rate"], plain.intervals["target_hit_rate"]
    assert h.method == "per-sample bootstrap" and p.method == "re-evaluated bootstrap"
    assert (h.value, h.lo, h.hi) == pytest.approx((p.value, p.lo, p.hi))  # the same resamples, the same metric
    with pytest.raises(FlowcoachError, match="is not its evaluate"):
        toy_result(64, ToyWithWrongHook())


def test_a_metric_of_distinct_samples_gets_no_interval_rather_than_a_wrong_one():
    r = toy_result(128, ToyWithUniqueness())
    iv = r.intervals["uniqueness"]
    assert iv.value == 1.0 and iv.lo is None and iv.method == "n/a" and "distinct samples" in iv.note
    assert r.intervals["target_hit_rate"].lo is not None


class ToyWithFlakyEvaluator(ToyDomain):
    """An evaluator that raises on every other call (the first, on the full set, succeeds)."""

    calls = 0

    def evaluate(self, objects, conditions):
        self.calls += 1
        if self.calls % 2 == 0:
            raise ValueError("degenerate resample")
        return super().evaluate(objects, conditions)


def test_a_resample_the_evaluator_fails_on_counts_as_missing(capsys):
    r = toy_result(64, ToyWithFlakyEvaluator(), bootstrap=200)
    iv = r.intervals["target_hit_rate"]
    assert iv.replicates == 100 and iv.lo <= iv.value <= iv.hi
    assert r.intervals["reward_mean"].replicates == 200  # per-sample values do not need the evaluator
    assert "the evaluator failed on a resample (ValueError: degenerate resample)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the report
NACL_CIF = """# as pymatgen's CifWriter writes a P1 structure
data_NaCl
_symmetry_space_group_name_H-M   'P 1'
_cell_length_a   3.98
_cell_length_b   3.98
_cell_length_c   3.98
_cell_angle_alpha   60.0
_cell_angle_beta   60.0
_cell_angle_gamma   60.0
_cell_volume   44.58
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
  Na  Na0  1  0.00000000  0.00000000  0.00000000  1
  Cl  Cl1  1  0.50000000  0.50000000  0.50000000  1
"""


def test_cif_parse_and_structure_view(tmp_path):
    name, lattice, symbols, frac = parse_cif(NACL_CIF)
    assert name == "NaCl" and symbols == ["Na", "Cl"] and frac.shape == (2, 3)
    assert abs(np.linalg.det(lattice)) == pytest.approx(44.58, rel=1e-3)  # the CIF's own cell volume
    assert np.linalg.norm(lattice, axis=1) == pytest.approx([3.98] * 3)
    (tmp_path / "a.cif").write_text(NACL_CIF)
    (tmp_path / "b.cif").write_text("data_broken\n_cell_length_a 1\n")
    assert plot_structures([tmp_path / "b.cif"], tmp_path / "none.png") is None
    assert plot_structures(sorted(tmp_path.glob("*.cif")), tmp_path / "v.png").stat().st_size > 1000


class ToyWithMedia(ToyDomain):
    """Toy's own samples are one PNG; this also writes the other kinds the science domains write
    (a GIF like video/grasping, WAVs like speech, a CIF like crystals), so every embed is covered."""

    def save(self, objects, rewards, directory):
        from PIL import Image

        files = super().save(objects, rewards, directory)
        frames = [Image.fromarray(np.full((24, 24, 3), 40 * k, np.uint8)) for k in range(4)]
        frames[0].save(directory / "rollouts.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        for k in range(2):
            with wave.open(str(directory / f"{k:03d}.wav"), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
                tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * k) * np.arange(4000) / 16000)
                w.writeframes((tone * 32767).astype("<i2").tobytes())
        (directory / "sample-0000.cif").write_text(NACL_CIF)
        return files + [directory / "rollouts.gif", directory / "000.wav", directory / "001.wav",
                        directory / "sample-0000.cif"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    cfg = algorithm_defaults("flow-grpo")
    cfg.output_dir, cfg.steps, cfg.groups_per_step, cfg.group_size = str(root / "runs"), 3, 4, 4
    cfg.eval_samples, cfg.eval_every, cfg.tensorboard, cfg.sample_every = 32, 2, False, 0
    run = train(cfg)
    entries = [parse_spec("toy=base"), parse_spec(f"toy={run}"), parse_spec(f"toy={run}/checkpoints/checkpoint-3")]
    out = compare(entries, root / "report", num_samples=128, num_steps=20, bootstrap=200,
                  domains={"toy": ToyWithMedia()})
    return out, run


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def parse(text: str) -> Elements:
    p = Elements()
    p.feed(text)
    return p


SECTIONS = ("summary", "metrics", "curves", "samples", "method")


def check_elements(doc: Elements, labels: list[str]) -> None:
    for section in SECTIONS:
        assert doc.find("section", id=section), section
    assert doc.find("table", **{"class": "summary"}) and doc.find("table", **{"class": "method"})
    assert doc.find("table", **{"class": "metrics", "data-domain": "toy"})
    assert doc.find("img", **{"class": "curve", "data-domain": "toy"})
    assert [a["data-model"] for a in doc.find("div", **{"class": "model-samples"})] == labels
    imgs, audio = doc.find("img"), doc.find("audio")
    assert len(imgs) == 1 + 3 * len(labels)  # the curves, then cif_views.png, samples.png, rollouts.gif per model
    assert len(audio) == 2 * len(labels)
    assert all(a["src"].startswith(("data:image/png;base64,", "data:image/gif;base64,")) for a in imgs)
    assert all(a["src"].startswith("data:audio/wav;base64,") for a in audio)
    assert len(doc.find("pre")) == len(labels)  # the CIF


def test_report_has_every_section(report):
    out, run = report
    labels = ["base", run.name, f"{run.name}/checkpoint-3"]
    md = (out / "report.md").read_text()
    for heading in ("# flowcoach compare", "## Summary", "## Held-out metrics", "### toy", "## Reward curves",
                    "## Samples", "## Method"):
        assert f"\n{heading}\n" in f"\n{md}", heading
    for key in METRICS:
        assert f"| {key} |" in md
    assert f"Δ {run.name} − base" in md and "![toy reward curves](curves/toy.png)" in md
    assert "![samples.png](samples/toy/base/samples.png)" in md and "[000.wav](samples/toy/base/000.wav)" in md
    assert (out / "curves" / "toy.png").stat().st_size > 1000
    text = (out / "report.html").read_text()
    check_elements(parse(text), labels)
    assert "http://" not in text and "https://" not in text and "<link" not in text  # self-contained
    data = json.loads((out / "metrics.json").read_text())["domains"]["toy"]
    assert list(data["models"]) == labels and data["reference"] == "base"
    tuned = data["models"][run.name]["metrics"]["reward_mean"]
    assert tuned["lo"] <= tuned["value"] <= tuned["hi"] and tuned["method"] == "per-sample bootstrap"
    # a run and its newest checkpoint are the same model
    assert data["models"][run.name]["metrics"] == data["models"][f"{run.name}/checkpoint-3"]["metrics"]
    assert data["deltas"][run.name]["reward_mean"]["value"] == pytest.approx(
        tuned["value"] - data["models"]["base"]["metrics"]["reward_mean"]["value"])


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                    "(apt-get install -y chromium chromium-driver; .ci/run installs it as root)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, run = report
    labels = ["base", run.name, f"{run.name}/checkpoint-3"]
    url = (out / "report.html").resolve().as_uri()
    flags = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "<body" in dom.stdout, dom.stderr[-2000:]
    doc = parse(dom.stdout)
    check_elements(doc, labels)  # every section and element survived the browser's parse
    (body,) = doc.find("body")
    assert body.get("data-checked") == "yes", body  # the page's own check ran after load
    assert body["data-images-broken"] == "0" and int(body["data-images-loaded"]) == 1 + 3 * len(labels)
    assert body["data-media-broken"] == "0" and int(body["data-media-loaded"]) == 2 * len(labels)

    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and pixels[..., :3].std() > 0.05  # rendered, not a blank page


# ----------------------------------------------------------------------------- the command line
def test_cli_prints_the_table_and_writes_the_report(tmp_path, capsys):
    assert main(["compare", "toy=base", "--num-samples", "64", "--num-steps", "10", "--bootstrap", "100",
                 "--output", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "toy: held-out metrics (95% intervals)" in printed and "target_hit_rate" in printed
    assert "written to" in printed
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "samples" / "toy" / "base").is_dir()
    assert "no training runs among this domain's models" in (tmp_path / "rep" / "report.md").read_text()


def make_foreign_checkpoint(root: Path) -> Path:
    ckpt = root / "run" / "checkpoints" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"domain": "grasping", "step": 5}))
    return ckpt.parent.parent


@pytest.mark.parametrize("args,expected", [
    (["nope=base"], "unknown domain 'nope'; choose one of: "),
    (["toy"], "'toy' is not DOMAIN=CHECKPOINT (e.g. toy=base or toy=runs/<run>)"),
    (["toy=no/such/run"], "'no/such/run' does not exist; give toy=base, a base model folder"),
    (["toy=FOREIGN"], "was trained on domain 'grasping', not 'toy'"),
    (["toy=EMPTY"], "holds no complete checkpoint"),
    ([], "nothing to compare; give models as DOMAIN=CHECKPOINT"),
    (["toy=base", "--bootstrap", "10"], "--bootstrap must be 0 (no intervals) or >= 40"),
    (["toy=base", "--num-samples", "1"], "--num-samples must be >= 2"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    foreign = make_foreign_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    args = [a.replace("FOREIGN", str(foreign)).replace("EMPTY", "empty") for a in args]
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "reports").exists()  # nothing evaluated or written before the inputs check out


def test_sample_files_embed_what_the_folder_holds(tmp_path):
    for name in ("grid.png", "samples.gif", "samples.mp4", "a.wav", "b.wav", "c.cif", "molecules.smi", "x.npy"):
        (tmp_path / name).write_bytes(b"0")
    kinds = sample_files(tmp_path, max_audio=1)
    assert [p.name for p in kinds["image"]] == ["grid.png", "samples.gif"]
    assert [p.name for p in kinds["audio"]] == ["a.wav"] and kinds["video"] == []  # the GIF already shows the mp4
    assert [p.name for p in kinds["text"]] == ["c.cif", "molecules.smi"]
    assert [p.name for p in kinds["other"]] == ["b.wav", "samples.mp4", "x.npy"]
