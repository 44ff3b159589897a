"""study.py: paired differences and their standard errors, cache keys, remembered arms, the behavioural
fingerprint, and the pairing premise (one seed gives every arm the same initial encoder). No arm is trained here:
the fingerprint test runs three 3-step trainings of 4 clips (~15 s), the rest takes seconds."""
import importlib.util
import json
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import model
import probes
import semantic
import study


def row(arm, seed, value, clips=None):
    r = {"method": arm, "seed": seed, "vos_clustering": value, "knn": value / 2}
    if clips is not None:
        r["clips"] = {"clustering": list(clips), "overclustering": list(clips)}
    return r


def test_paired_difference_and_se_over_seeds():
    a, b = [80.0, 76.5, 79.0, 81.0], [70.0, 69.0, 71.5, 70.0]
    rows = [row("sigma", s, v) for s, v in enumerate(a)] + [row("pixel", s, v) for s, v in enumerate(b)]
    rows.append(row("sigma", 9, 50.0))  # a seed the other arm lacks is not paired
    p = study.paired(rows, "sigma", "pixel", "vos_clustering")
    d = np.subtract(a, b)
    assert p["seeds"] == [0, 1, 2, 3]
    assert p["diff"] == pytest.approx(d.mean())
    assert p["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(4))
    assert p["se_from"] == "seeds"
    # Pairing removes what the arms share: a seed effect common to both arms leaves the SE unchanged.
    shifted = [row("sigma", s, v + 10 * s) for s, v in enumerate(a)] + [row("pixel", s, v + 10 * s) for s, v in enumerate(b)]
    assert study.paired(shifted, "sigma", "pixel", "vos_clustering")["se"] == pytest.approx(p["se"])
    assert study.paired(rows, "sigma", "l2", "vos_clustering") is None


def test_the_same_difference_at_every_seed_has_no_se_and_no_test():
    # Top-1 on 500 clips moves in steps of 0.2: both per-seed differences are -2.2 up to the float32 rounding of
    # the read-outs (these four values are from a budget-curve run), a stdev of ~1e-6. It must not become a
    # "-3e6 SE" difference that Holm calls.
    rows = [row("clip", 0, 25.600001215934753), row("clip", 1, 22.80000001192093),
            row("random", 0, 27.799999713897705), row("random", 1, 25.0)]
    p = study.paired(rows, "clip", "random", "vos_clustering")
    assert p["diff"] == pytest.approx(-2.2) and p["se"] == 0.0
    other = study.paired([row("sigma", 0, 80.0), row("sigma", 1, 77.0), row("pixel", 0, 70.0), row("pixel", 1, 71.0)],
                         "sigma", "pixel", "vos_clustering")
    study.holm([p, other], family=[p, other])
    assert "p" not in p and "called" not in p and "p" in other and other["p_holm"] == other["p"]  # a family of one
    assert "no t-test" in study.pair_line(p) and "SE (" not in study.pair_line(p)


def test_paired_one_seed_uses_clip_level_se():
    rng = np.random.default_rng(0)
    clips_a, clips_b = rng.uniform(40, 100, 200), rng.uniform(40, 100, 200)
    rows = [row("sigma", 0, clips_a.mean(), clips_a), row("random", 0, clips_b.mean(), clips_b)]
    p = study.paired(rows, "sigma", "random", "vos_clustering")
    d = clips_a - clips_b
    assert p["se_from"] == "clips"
    assert p["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(200))
    assert p["diff"] == pytest.approx(d.mean())
    # No per-clip scores for the semantic metric: no SE from one seed.
    assert study.paired(rows, "sigma", "random", "knn")["se"] is None


def edit(path, old, new):
    """Replace the one occurrence of `old` in a copied source file."""
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: {old!r} not found once"
    path.write_text(text.replace(old, new))


def use_copy(monkeypatch, folder):
    """study reads its code from `folder` (its cache keys: semantic's digests) and resolves the arms' options with
    the train.py there."""
    monkeypatch.setattr(study, "HERE", folder)
    monkeypatch.setattr(semantic, "HERE", folder)
    spec = importlib.util.spec_from_file_location("train_copy", folder / "train.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    monkeypatch.setattr(study, "train", copy)


def test_cache_keys_follow_settings_data_and_code_not_comments(tmp_path, monkeypatch):
    for f in set(study.TRAIN_CODE + study.EVAL_CODE):
        shutil.copy(study.HERE / f, tmp_path / f)
    use_copy(monkeypatch, tmp_path)
    params = {"version": 2, "seed": 0, "num_train": 2000}
    key, ekey = study.run_key("--loss sigma", params), study.eval_key()
    assert study.run_key("--loss sigma", params) == key  # stable
    assert study.run_key("--loss pixel", params) != key  # the arm's settings...
    assert study.run_key("--loss sigma --num_prototypes 256", params) == key  # ... as resolved (256 is the recipe's)
    assert study.run_key("--loss sigma", {**params, "num_train": 1000}) != key  # the dataset
    # Comments, docstrings and formatting are not code: nothing retrains or re-evaluates.
    with open(tmp_path / "model.py", "a") as f:
        f.write("\n# a comment\n")
    edit(tmp_path / "model.py", '"""\nSIGMA:', '"""\nAn edited docstring.\nSIGMA:')
    edit(tmp_path / "model.py", "def patchify(videos, tubelet, patch):", "def patchify(videos,\n  tubelet, patch) :")
    assert study.run_key("--loss sigma", params) == key and study.eval_key() == ekey
    with open(tmp_path / "model.py", "a") as f:  # the code that trains and reads out
        f.write("\nUNUSED = 1\n")
    key2, ekey2 = study.run_key("--loss sigma", params), study.eval_key()
    assert key2 != key and ekey2 != ekey  # model.py is part of both
    with open(tmp_path / "eval_vos.py", "a") as f:  # evaluation-only code: re-evaluate, don't retrain
        f.write("\nUNUSED = 1\n")
    assert study.run_key("--loss sigma", params) == key2 and study.eval_key() != ekey2
    with open(tmp_path / "ranks.py", "a") as f:  # train.py imports ranks.py
        f.write("\nUNUSED = 1\n")
    assert study.run_key("--loss sigma", params) != key2


def test_reuse_same_behaviour_reuses_only_runs_that_train_the_same(tmp_path, monkeypatch):
    """A default-off option changes the code but not what it computes: --reuse_same_behaviour finds the cached
    run by its fingerprint (3 steps of train.py in a process of its own, on the edited copy). A change of the
    numbers -- Sinkhorn at twice the eps, or another default for an option the recipe leaves unset -- retrains
    in both modes."""
    code = tmp_path / "code"
    code.mkdir()
    for f in set(study.TRAIN_CODE) | {"study.py", "semantic.py", "probes.py", "eval_vos.py"}:
        shutil.copy(study.HERE / f, code / f)
    use_copy(monkeypatch, code)
    out, params, flags = tmp_path / "out", {"version": 2, "num_train": 2000}, "--loss sigma"
    cached = study.arm_folder("sigma", flags, params, out)
    record = json.loads((cached / "arm.json").read_text())
    assert record["flags"] == flags and len(record["fingerprint"]["losses"]) == 3

    edit(code / "train.py", "\n    return p\n", '\n    a("--extra", action="store_true", help="off by default")'
         '\n    return p\n')
    use_copy(monkeypatch, code)
    assert study.settings(flags)["extra"] is False
    assert f"sigma-{study.run_key(flags, params)}" != cached.name  # the default: other code, retrain
    assert study.arm_folder("sigma", flags, params, out, reuse=True) == cached  # same behaviour: reused

    edit(code / "sinkhorn.py", "P.div_(eps).exp_()", "P.div_(2 * eps).exp_()")
    use_copy(monkeypatch, code)
    changed = study.arm_folder("sigma", flags, params, out, reuse=True)
    assert changed != cached and changed.name == f"sigma-{study.run_key(flags, params)}"
    assert json.loads((changed / "arm.json").read_text())["fingerprint"]["weights"] != record["fingerprint"]["weights"]

    # A default the recipe leaves unset is a setting: another value retrains even if the fingerprint missed it.
    edit(code / "train.py", 'a("--sk_iters", type=int, default=10,', 'a("--sk_iters", type=int, default=5,')
    use_copy(monkeypatch, code)
    assert not study.same_behaviour(record, {**record, "settings": study.settings(flags)})
    assert study.same_behaviour(record, {**record, "settings": {**study.settings(flags), "sk_iters": 10}})


def fake_results(folder, value, trained):
    """A seed folder as measure() leaves it, with made-up scores: no training, no evaluation."""
    folder.mkdir(parents=True)
    ekey = study.eval_key()
    clips = [{"clustering": value / 100 + d, "overclustering": value / 100} for d in (-0.01, 0.01)]
    (folder / f"vos-{ekey}.json").write_text(json.dumps({"mean": {"clustering": value / 100,
                                                                  "overclustering": value / 100}, "clips": clips}))
    (folder / f"linear-{ekey}.json").write_text(json.dumps({"top1": value / 2, "probes": {"knn": {"top1": value}}}))
    names = [n + std for n in semantic.readout_names(7) for std in ("", "/std")]
    per_layer = {k: {n: 0.5 for n in semantic.readout_names(7)} for k in
                 ("within_clip_similarity", "max_channel_ratio", "effective_rank")}
    (folder / f"semantic-{study.semantic_key()}.json").write_text(json.dumps(
        {"val": dict.fromkeys(names, value), "holdout": dict.fromkeys(names, value), **per_layer}))
    if trained:
        (folder / "done").touch()


def test_arms_are_remembered_by_list_and_compare(tmp_path, monkeypatch, capsys):
    """Each arm's flags are stored beside its runs (arm.json): --list shows them with the seeds, and --compare
    reads an arm defined by a past command without --arm, from the cache, running nothing."""
    out, deep = tmp_path / "out", "--loss sigma --proj_hidden 64 64"
    params = dict(num_train=2000, num_val=500, num_vos=200, dense_classes=["background", "a", "b", "c", "d"])
    monkeypatch.setattr(study, "behaviour", lambda flags, out: {"flags": flags})
    for arm, flags, values in (("random", None, (50.0,)), ("sigma", "--loss sigma", (75.0, 77.0)),
                               ("deep", deep, (74.0, 75.0))):
        folder = study.arm_folder(arm, flags, params, out)
        for seed, value in enumerate(values):
            fake_results(folder / f"seed{seed}", value, trained=flags is not None)
    (out / "deep-0123456789ab").mkdir()  # a folder without arm.json is not an arm

    study.main(["--list", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    listed = {line.split()[0]: line for line in lines}
    assert "seeds 0 1" in listed["deep"] and deep in listed["deep"] and "other code" not in listed["deep"]
    assert "seeds 0 " in listed["random"] and "(not trained)" in listed["random"]

    with pytest.raises(SystemExit):  # another cache folder does not know "deep"
        study.get_args(["--compare", "sigma", "deep", "--out", str(tmp_path / "elsewhere")])
    assert "unknown arm 'deep'" in capsys.readouterr().err
    root = tmp_path / "fashion"
    root.mkdir()
    (root / "meta.json").write_text(json.dumps(params))
    monkeypatch.setattr(study, "fashion_dataset", lambda: root)
    monkeypatch.setattr(study, "vos_chance", lambda root: 40.0)
    for name in ("run", "behaviour"):  # everything comes from the cache
        monkeypatch.setattr(study, name, lambda *a, **k: pytest.fail("computed instead of read from the cache"))
    results = study.main(["--compare", "sigma", "deep", "--seeds", "0", "1", "--out", str(out),
                          "--results", str(tmp_path / "r.json")])
    assert {r["method"]: r["flags"] for r in results["rows"]} == {"sigma": "--loss sigma", "deep": deep}
    pair = next(p for p in results["pairs"] if p["metric"] == "vos_clustering")
    assert (pair["a"], pair["b"], pair["seeds"]) == ("sigma", "deep", [0, 1])
    assert pair["diff"] == pytest.approx(1.5) and pair["se"] == pytest.approx(0.5)


def test_arms_and_bad_options(capsys):
    args = study.get_args(["--arm", 'deep=--loss sigma --proj_hidden 1024 1024 1024', "--seeds", "0", "1"])
    assert args.arms == ["random", "sigma", "deep"] and args.arm_flags["deep"].endswith("1024 1024 1024")
    assert study.get_args(["--quick"]).arms == study.QUICK and study.get_args(["--quick"]).seeds == [0]
    assert study.get_args([]).arms == study.FULL and study.get_args([]).ceiling_epochs == study.EPOCHS_CEILING
    assert study.get_args(["--arms", "random"]).ceiling_epochs == 0  # the reference only with the full study
    assert study.get_args(["--compare", "sigma", "pixel"]).arms == ["sigma", "pixel"]
    for bad, word in ((["--arms", "nope"], "nope"), (["--arm", "no flags"], "--arm"),
                      (["--compare", "sigma", "nope"], "nope"), (["--seeds", "-1"], "--seeds"),
                      (["--jobs", "0"], "--jobs")):
        with pytest.raises(SystemExit) as e:
            study.get_args(bad)
        assert e.value.code == 2 and word in capsys.readouterr().err


def test_run_counts_the_cpu_of_its_own_process_only(tmp_path):
    """Runs go on side by side (--jobs): each one's CPU minutes must be its own, not whatever else finished
    meanwhile (the process-wide RUSAGE_CHILDREN would give the idle run the busy run's half second)."""
    busy = [sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"]
    idle = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    with ThreadPoolExecutor(2) as pool:
        idle_cpu, busy_cpu = pool.submit(study.run, idle, tmp_path / "i.log"), pool.submit(study.run, busy, tmp_path / "b.log")
        idle_cpu, busy_cpu = 60 * idle_cpu.result(), 60 * busy_cpu.result()
    assert busy_cpu >= 0.5 and idle_cpu < 0.3
    with pytest.raises(SystemExit, match="failed"):
        study.run([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "f.log")


def test_one_seed_gives_every_arm_the_same_initial_encoder():
    """The premise of pairing: train.py seeds, then builds the model; the encoder is built first, so its initial
    weights do not depend on the loss, the target or the number of prototypes, and equal the random-init arm's."""
    def encoder_at_init(**options):
        torch.manual_seed(5)
        return {k.removeprefix("encoder."): v for k, v in model.build_model("tiny", **options).state_dict().items()
                if k.startswith("encoder.")}

    sigma = encoder_at_init(loss="sigma", target="mlp", num_prototypes=256)
    torch.manual_seed(5)
    random_arm = model.load_encoder("random", "tiny")[0].state_dict()
    for other in (encoder_at_init(loss="pixel", target="pixel"), encoder_at_init(loss="l2", target="mlp"),
                  encoder_at_init(loss="sigma", target="mlp", num_prototypes=64), random_arm):
        assert other.keys() == sigma.keys() and all(torch.equal(other[k], sigma[k]) for k in sigma)


def test_fine_tune_starts_from_the_seeds_initial_encoder_and_trains_all_of_it(tiny_synthetic, tmp_path, monkeypatch):
    """The supervised reference is fine_tune('random'): at 0 epochs it saves exactly the encoder every arm of that
    seed starts from; after training, every encoder weight has moved (token dropping leaves none without a
    gradient) and the result file holds the recipe and a top-1."""
    monkeypatch.setitem(semantic.CEILING, "batch_size", 4)  # 16 train clips: 4 steps an epoch
    semantic.fine_tune("random", tiny_synthetic, 3, 0, tmp_path / "start.json", save_encoder=True)
    torch.manual_seed(3)
    init, _ = model.load_encoder("random", "tiny")
    start, _ = model.load_encoder(str(tmp_path / "start.pth"), "tiny")
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), start.state_dict().values()))
    semantic.fine_tune("random", tiny_synthetic, 3, 2, tmp_path / "tuned.json", save_encoder=True)
    tuned, _ = model.load_encoder(str(tmp_path / "tuned.pth"), "tiny")
    moved = {k: not torch.equal(v, tuned.state_dict()[k]) for k, v in init.named_parameters()}
    assert all(moved.values()), [k for k, m in moved.items() if not m]
    result = json.loads((tmp_path / "tuned.json").read_text())
    assert result["epochs"] == 2 and result["keep"] == semantic.CEILING["keep"] and 0 <= result["top1"] <= 100


def test_read_outs_of_other_code_are_reused_only_with_the_same_eval_fingerprint(tmp_path):
    """--reuse_same_behaviour and the read-outs: a read-out made by other code (another key) is taken when its
    recorded eval fingerprint is this code's; never in the default mode, never with another fingerprint."""
    folder = tmp_path / "seed0"
    folder.mkdir()
    old = folder / "vos-aaaaaaaaaaaa.json"
    old.write_text("{}")
    fp = dict(vos="c1", linear="l1", semantic="s1", behaviour="b1")
    study.remember_readout(old, lambda: fp)
    same = lambda: {**fp, "linear": "l2"}  # other eval_linear.py code: the VOS read-out is still the same
    other = lambda: {**fp, "behaviour": "b2"}  # the shared modules compute something else
    assert study.readout_path(folder, "vos", "bbbbbbbbbbbb", same, reuse=True) == old
    assert study.readout_path(folder, "vos", "bbbbbbbbbbbb", same, reuse=False) == folder / "vos-bbbbbbbbbbbb.json"
    assert study.readout_path(folder, "vos", "bbbbbbbbbbbb", other, reuse=True) == folder / "vos-bbbbbbbbbbbb.json"
    assert study.readout_path(folder, "semantic", "bbbbbbbbbbbb", same, reuse=True).name == "semantic-bbbbbbbbbbbb.json"


def test_holm_calls_a_family_as_the_step_down_rule_says():
    # Three paired differences over 5 seeds with known t statistics: p from Student's t with 4 df, then Holm.
    from scipy.stats import t
    # A fourth pair, a diagnostic outside the family, gets its own p but no Holm and does not enlarge the family.
    pairs = [dict(diff=d, se=1.0, seeds=[0, 1, 2, 3, 4]) for d in (6.0, 3.0, 1.0, 8.0)]
    study.holm(pairs, family=pairs[:3])
    p = [2 * t.sf(d, 4) for d in (6.0, 3.0, 1.0, 8.0)]
    assert [q["p"] for q in pairs] == pytest.approx(p)
    expected = [3 * p[0], max(3 * p[0], 2 * p[1]), max(3 * p[0], 2 * p[1], p[2])]
    assert [q["p_holm"] for q in pairs[:3]] == pytest.approx(expected)
    assert [q["called"] for q in pairs[:3]] == [e < 0.05 for e in expected] == [True, False, False]
    assert "p_holm" not in pairs[3] and "called" not in pairs[3]
    line = study.pair_line({**pairs[3], "a": "sigma", "b": "pixel", "metric": "semantic", "se_from": "seeds"})
    assert "outside the corrected family" in line and "Holm" not in line


def test_the_read_out_rule_picks_the_largest_reference_gap_on_held_out_train_clips():
    reference = {"holdout": {"block3": 60.0, "norm": 70.0, "norm/std": 72.0}, "val": {"block3": 99.0}}
    random_init = {"holdout": {"block3": 30.0, "norm": 35.0, "norm/std": 45.0}, "val": {"block3": 0.0}}
    choice, gaps = semantic.choose_readout(reference, random_init)
    assert choice == "norm" and gaps[0] == (35.0, "norm")  # 35 > 30 > 27; the val numbers play no part


def test_layer_features_pool_every_block_and_measure_the_tokens_as_written_out():
    torch.manual_seed(0)
    encoder, cfg = study.model.load_encoder("random", "tiny", enc_depth=2)
    encoder.eval()
    x = torch.randint(0, 256, (3, 3, cfg.num_frames, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    pooled, similarity, channels = probes.layer_features(encoder, x)
    with torch.no_grad():
        t = encoder.patch_embed(study.data.normalize(x)) + encoder.pos_embed
        layers = [t := block(t) for block in encoder.blocks]
        layers.append(encoder.norm(t))
    assert pooled.shape == (3, 3, cfg.enc_dim)
    for i, tokens in enumerate(layers):  # (3, N, D)
        assert torch.allclose(pooled[:, i], tokens.mean(1), atol=1e-5)
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        cos = unit @ unit.transpose(1, 2)  # (3, N, N)
        n = tokens.shape[1]
        assert similarity[i] == pytest.approx(float(((cos.sum((1, 2)) - n) / (n * (n - 1))).mean()), abs=1e-5)
        rms = tokens.square().mean((0, 1)).sqrt()
        assert channels[i] == pytest.approx(float(rms.max() / rms.median()), rel=1e-4)
    # Effective rank: D equal singular values give D, one direction gives 1.
    assert probes.effective_rank(torch.eye(8).repeat(2, 1)) == pytest.approx(8, rel=0.15)
    assert probes.effective_rank(torch.randn(50, 1) * torch.randn(1, 8)) == pytest.approx(1, abs=1e-3)


def test_cached_reports_only_the_seeds_already_pretrained(tmp_path, monkeypatch):
    out = tmp_path / "out"
    params = dict(num_train=2000, num_val=500, num_vos=200, dense_classes=["background", "a", "b", "c", "d"])
    monkeypatch.setattr(study, "behaviour", lambda flags, out: {"flags": flags})
    for arm, flags, values in (("sigma", "--loss sigma", (75.0, 77.0)), ("pixel", "--loss pixel", (74.0,))):
        folder = study.arm_folder(arm, flags, params, out)
        for seed, value in enumerate(values):
            fake_results(folder / f"seed{seed}", value, trained=True)
    root = tmp_path / "fashion"
    root.mkdir()
    (root / "meta.json").write_text(json.dumps(params))
    monkeypatch.setattr(study, "fashion_dataset", lambda: root)
    monkeypatch.setattr(study, "vos_chance", lambda root: 40.0)
    monkeypatch.setattr(study, "run", lambda *a, **k: pytest.fail("trained or computed instead of read"))
    results = study.main(["--cached", "--arms", "sigma", "pixel", "--seeds", "0", "1", "--out", str(out),
                          "--results", str(tmp_path / "r.json")])
    assert sorted((r["method"], r["seed"]) for r in results["rows"]) == [("pixel", 0), ("sigma", 0), ("sigma", 1)]


def test_object_shares_are_the_masks_at_the_clips_frames_cut_into_tubes(tiny_synthetic):
    _, cfg = study.model.load_encoder("random", "tiny")
    shares = semantic.object_shares(tiny_synthetic, "val", cfg)  # (8, 256)
    ds = study.data.build_video_dataset("synthetic", tiny_synthetic, "val", num_frames=cfg.num_frames,
                                        size=cfg.img_size, stride=2, train=False)
    assert shares.shape == (len(ds), cfg.num_tokens)
    t, p, s = cfg.tubelet_size, cfg.patch_size, cfg.img_size
    for i, (path, _) in enumerate(ds.samples):
        masks = np.load(path.replace(".mp4", ".mask.npy")) > 0  # (16, 64, 64)
        frames = masks[ds._positions(len(masks))[0].numpy()]  # (8, 64, 64)
        tubes = frames.reshape(cfg.num_frames // t, t, s // p, p, s // p, p).mean((1, 3, 5))  # (T', H', W')
        assert np.allclose(shares[i].numpy(), tubes.reshape(-1), atol=1e-6)
    assert 0 < shares.mean() < 1  # a garment on a background in every set


def test_object_readout_pools_in_a_process_of_its_own_and_its_whole_clip_pool_is_the_semantic_metric(
        tmp_path, monkeypatch):
    root = study.synthetic_dataset(tmp_path / "set", seed=1, num_train=40, num_val=12, num_frames=16, size=64,
                                   num_vos=0)
    monkeypatch.setattr(semantic, "READOUT_BANK", 30)  # 40 train clips: 30 in the bank, 10 held out
    semantic.semantic_readout("random", root, 0, tmp_path / "semantic.json")
    cpu = study.run_readout("object_readout", "random", root, 0, tmp_path / "object.json", tmp_path / "log", threads=1)
    objects, sem = json.loads((tmp_path / "object.json").read_text()), json.loads((tmp_path / "semantic.json").read_text())
    assert cpu > 0 and list(objects["val"]) == list(semantic.OBJECT_POOLS)
    assert objects["val"]["whole"] == pytest.approx(sem["val"][semantic.SEMANTIC_READOUT], abs=100 / 12 + 1e-6)
    assert 0 < objects["garment_share"] < 1


def test_pooled_where_weights_the_chosen_layers_tokens():
    torch.manual_seed(0)
    encoder, cfg = study.model.load_encoder("random", "tiny", enc_depth=2)
    encoder.eval()
    x = torch.randint(0, 256, (3, 3, cfg.num_frames, cfg.img_size, cfg.img_size), dtype=torch.uint8)
    shares = torch.zeros(3, cfg.num_tokens)
    shares[:, :10] = 1.0  # the "garment": the first 10 tokens of every clip
    shares[2, 10:20] = 0.5
    whole, _, _ = probes.layer_features(encoder, x)  # (3, L, D) mean over all tokens, per layer
    with torch.no_grad():
        tokens = encoder.blocks[0](encoder.patch_embed(study.data.normalize(x)) + encoder.pos_embed)  # block1
    for layer, index in (("block1", 0), ("norm", 2)):
        pooled = semantic.pooled_where(encoder, x, shares, layer)  # (3, 3, D): object, background, whole
        assert torch.allclose(pooled[:, 2], whole[:, index], atol=1e-5)
    pooled = semantic.pooled_where(encoder, x, shares, "block1")
    assert torch.allclose(pooled[0, 0], tokens[0, :10].mean(0), atol=1e-5)
    assert torch.allclose(pooled[0, 1], tokens[0, 10:].mean(0), atol=1e-5)
    w = shares[2]  # soft shares: a weighted mean
    assert torch.allclose(pooled[2, 0], (w[:, None] * tokens[2]).sum(0) / w.sum(), atol=1e-5)
    assert not encoder.norm._forward_hooks and not encoder.blocks[0]._forward_hooks  # the hooks are removed


def test_budget_trains_in_stages_keeps_each_checkpoint_and_reads_each_out(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "TRAIN", ["--dataset", "synthetic", "--arch", "tiny", "--batch_size", "8",
                                         "--micro_batch", "8", "--epochs", "1", "--warmup_epochs", "0",
                                         "--workers", "0", "--save_every", "1", "--precision", "fp32",
                                         "--no-first_look"])
    read = []
    monkeypatch.setattr(study, "read_outs", lambda arm, seed, ckpt, folder, *a, **k:
                        read.append(ckpt[1]) or {"method": arm, "seed": seed})
    flags = study.longer("--loss sigma")
    assert flags == f"--loss sigma --epochs {max(study.BUDGET_MULTIPLES)}"
    arm = tmp_path / "arm"
    rows = study.measure_budget("sigma", flags, 0, tiny_synthetic, arm, threads=1)
    assert [r["budget"] for r in rows] == [study.EPOCHS * m for m in study.BUDGET_MULTIPLES]
    assert read == [str(arm / "seed0" / f"x{m}" / "ckpt.pth") for m in study.BUDGET_MULTIPLES]
    for m in study.BUDGET_MULTIPLES:  # each stage's checkpoint is the run at m x the arm's epochs
        ckpt = model.load_checkpoint(arm / "seed0" / f"x{m}" / "ckpt.pth")
        assert ckpt["epoch"] == m and ckpt["config"]["epochs"] == max(study.BUDGET_MULTIPLES)
        log = (arm / "seed0" / f"x{m}" / "log.jsonl").read_text().splitlines()  # the run's log up to the stage
        assert json.loads(log[-1])["epoch"] == pytest.approx(m) and "target_std" in json.loads(log[-1])
    # A stage whose checkpoint is gone while the run went on cannot be recovered: a clear stop, not a wrong copy.
    shutil.rmtree(arm / "seed0" / "x2")
    with pytest.raises(SystemExit, match="x2"):
        study.measure_budget("sigma", flags, 0, tiny_synthetic, arm, threads=1)


def test_budget_defaults():
    args = study.get_args(["--budget"])
    assert (args.arms, args.seeds, args.ceiling_epochs) == (study.BUDGET_ARMS, study.BUDGET_SEEDS, 0)
    args = study.get_args(["--budget", "--arms", "sigma", "--seeds", "3"])
    assert (args.arms, args.seeds) == (["sigma"], [3])


def test_budget_refuses_options_it_would_ignore(capsys):
    with pytest.raises(SystemExit) as stop:
        study.get_args(["--budget", "--linear", "--train_only"])
    assert stop.value.code == 2 and "drop --train_only --linear" in capsys.readouterr().err


def test_budget_cached_reports_finished_runs_and_pairs_them_with_random_init(tmp_path, monkeypatch):
    out = tmp_path / "out"
    params = dict(num_train=2000, num_val=500, num_vos=200, dense_classes=["background", "a", "b", "c", "d"])
    root = tmp_path / "fashion"
    root.mkdir()
    (root / "meta.json").write_text(json.dumps(params))
    monkeypatch.setattr(study, "fashion_dataset", lambda: root)
    monkeypatch.setattr(study, "behaviour", lambda flags, out: {"flags": flags})
    monkeypatch.setattr(study, "eval_behaviour", lambda root, out: {"behaviour": "b"})
    last = f"x{max(study.BUDGET_MULTIPLES)}"
    folder = study.arm_folder("sigma", study.longer("--loss sigma"), params, out / "budget")
    for seed in (0, 1):  # sigma finished at seeds 0 and 1, pixel only at seed 0
        (folder / f"seed{seed}" / last).mkdir(parents=True)
        (folder / f"seed{seed}" / last / "ckpt.pth").touch()
    folder = study.arm_folder("pixel", study.longer("--loss pixel"), params, out / "budget")
    (folder / "seed0" / last).mkdir(parents=True)
    (folder / "seed0" / last / "ckpt.pth").touch()
    ran = []

    def fake_budget(arm, flags, seed, *a):
        ran.append((arm, seed))
        return [{"method": arm, "seed": seed, "budget": study.EPOCHS * m, "vos_clustering": 70.0 + m + seed,
                 "semantic": 30.0 + m * (1 + seed)} for m in study.BUDGET_MULTIPLES]

    monkeypatch.setattr(study, "measure_budget", fake_budget)
    monkeypatch.setattr(study, "measure", lambda arm, flags, seed, *a, **k:
                        {"method": arm, "seed": seed, "vos_clustering": 50.0, "semantic": 25.0})
    results = study.main(["--budget", "--cached", "--arms", "pixel", "sigma", "--seeds", "0", "1", "--out", str(out),
                          "--results", str(tmp_path / "b.json")])
    assert sorted(ran) == [("pixel", 0), ("sigma", 0), ("sigma", 1)]
    top = max(study.BUDGET_MULTIPLES)
    pair = next(p for p in results["pairs"] if (p["a"], p["b"], p["metric"], p["budget"]) ==
                ("sigma", "random", "semantic", study.EPOCHS * top))
    assert pair["seeds"] == [0, 1] and pair["diff"] == pytest.approx(30 + top * 1.5 - 25)  # (top + 2 top) / 2
    assert pair["se"] == pytest.approx(top / 2)  # differences 5 + top and 5 + 2 top: SD top / sqrt 2, / sqrt 2
