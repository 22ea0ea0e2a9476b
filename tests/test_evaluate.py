"""`jaxdiff eval`: FID/IS from sampled shards, bits/dim, the report file, bad input."""

import json
import re

import numpy as np
import pytest

from jaxdiff.cli import main
from jaxdiff.evaluation.evaluate import evaluate, parse_metrics
from jaxdiff.evaluation.fid import ActivationStatistics, frechet_distance, inception_score, save_statistics
from jaxdiff.evaluation.inception import inception_features
from jaxdiff.sampling.pipeline import Pipeline
from jaxdiff.sampling.shard_jobs import read_shards
from jaxdiff.evaluation.inception_weights import random_params
from tests.helpers import write_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval")
    write_workdir(path)
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fid_and_is_of_the_sampled_shards(workdir, tmp_path):
    params = random_params()
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 2048))
    save_statistics(tmp_path / "ref.npz", reference.mean(0), np.cov(reference, rowvar=False))
    pipe = Pipeline.from_checkpoint(workdir)
    report = evaluate(
        pipe, str(workdir), metrics=("fid", "is"), num_samples=10, sampler="ddim", steps=3, shard_size=5,
        inception_params=params, inception_weights_sha256="0" * 64, reference_path=str(tmp_path / "ref.npz"),
        inception_batch=5, progress=False,
    )  # fmt: skip
    samples = read_shards(report["settings"]["samples_dir"])
    outputs = [inception_features(params, samples[i : i + 5]) for i in (0, 5)]  # the shape evaluate compiled
    pool = np.concatenate([np.asarray(p) for p, _ in outputs])
    logits = np.concatenate([np.asarray(l) for _, l in outputs])
    stats = ActivationStatistics()
    stats.update(np.asarray(pool, np.float64))
    want_fid = frechet_distance(stats.mean, stats.covariance, reference.mean(0), np.cov(reference, rowvar=False))
    assert report["results"]["fid"] == pytest.approx(want_fid, rel=1e-4)
    want_is, _ = inception_score(np.asarray(logits, np.float64), splits=10)
    assert report["results"]["is_mean"] == pytest.approx(want_is, rel=1e-4)
    saved = json.loads((workdir / "eval_7.json").read_text())
    assert saved["results"]["fid"] == pytest.approx(want_fid, rel=1e-4)
    assert saved["settings"]["inception_weights_sha256"] == "0" * 64 and saved["settings"]["sampler"] == "ddim"


@pytest.mark.timeout(600)
def test_cli_bits_per_dim(workdir, capsys):
    assert main(["eval", "--workdir", str(workdir), "--metrics", "bpd", "--bpd-images", "2",
                 "--bpd-batch-size", "2", "--bpd-num-t", "4"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    bpd = float(out.split("bpd: ")[1].split()[0])
    assert 0 < bpd < 100
    saved = json.loads((workdir / "eval_7.json").read_text())
    assert saved["results"]["bpd"] == pytest.approx(bpd, abs=1e-4)
    assert saved["settings"]["bpd_estimator"] == "stratified"


def test_bad_input(workdir, tmp_path, capsys):
    with pytest.raises(ValueError, match="fdi"):
        parse_metrics("fid,fdi")
    assert main(["eval", "--workdir", str(workdir), "--metrics", "fid",
                 "--inception-weights", str(tmp_path / "missing.pth")]) == 2  # fmt: skip
    assert "missing.pth" in capsys.readouterr().err
    assert main(["eval", "--workdir", str(tmp_path), "--metrics", "bpd"]) == 2
    assert "unknown weights format" in capsys.readouterr().err


DIGITS = ("--config.data.dataset=digits", "--config.model.image_size=8", "--config.model.in_channels=1",
          "--config.model.out_channels=1", "--config.model.attn_resolutions=(4,)")  # fmt: skip


@pytest.mark.timeout(600)
def test_bits_per_dim_uses_the_held_out_split_or_the_one_asked_for(tmp_path, monkeypatch, capsys):
    from jaxdiff.evaluation import evaluate as evaluate_module

    write_workdir(tmp_path, *DIGITS)
    seen = []
    real = evaluate_module._data_source

    def spy(pipe, split, data_dir):
        source = real(pipe, split, data_dir)
        seen.append((split, source.num_examples))
        return source

    monkeypatch.setattr(evaluate_module, "_data_source", spy)
    bpd = dict(bpd_batch_size=2, bpd_num_images=2, bpd_num_t=2, progress=False)
    report = evaluate(Pipeline.from_checkpoint(tmp_path), str(tmp_path), metrics=("bpd",), **bpd)
    assert seen == [("test", 360)] and report["settings"]["bpd_split"] == "test"  # digits' 360 held-out images
    assert json.loads((tmp_path / "bpd_step7_test.json").read_text())["bpd"] == report["results"]["bpd"]
    assert main(["eval", "--workdir", str(tmp_path), "--metrics", "bpd", "--split", "train", "--bpd-images", "2",
                 "--bpd-batch-size", "2", "--bpd-num-t", "2"]) == 0  # fmt: skip
    assert seen[1] == ("train", 1437)
    assert json.loads((tmp_path / "eval_7.json").read_text())["settings"]["bpd_split"] == "train"
    captured = capsys.readouterr()
    assert (tmp_path / "bpd_step7_train.json").exists() and "bpd: " in captured.out
    assert re.search(r"bits/dim: 100%.*1/1 \[", captured.err), captured.err  # the progress bar, finished
