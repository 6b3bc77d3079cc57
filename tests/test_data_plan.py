"""`make figures PROFILE=paper DOWNLOAD=1`: what it would download, checked without a network."""

from __future__ import annotations

import pytest

from lance_lib.experiments.data_plan import download, download_plan, main, profile_datasets


def test_paper_plan_downloads_what_torchvision_can_and_names_the_rest(tmp_path):
    plan = {item.name: item for item in download_plan("paper", root=tmp_path)}  # an empty root
    assert plan["cifar10_mini"].action == "present"  # shipped with the repository
    for name in ("cifar10", "cifar100", "mnist", "fashionmnist", "svhn", "oxford_pets"):
        assert plan[name].action == "download", name
    for name in ("miniimagenet", "notmnist", "cub200"):  # no automatic download
        assert plan[name].action == "manual", name
        assert "http" in plan[name].source + plan[name].layout  # where to get it
    assert "svhn" in plan  # named only by Table 3's 5-Datasets benchmark
    # nothing is fetched for present or manual items; the manual ones come back
    manual = download([plan["cifar10_mini"], plan["notmnist"]], root=tmp_path)
    assert [item.name for item in manual] == ["notmnist"] and not any(tmp_path.iterdir())


def test_an_incomplete_dataset_is_planned_for_download(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    plan = {item.name: item for item in download_plan({"s": {"dataset": "mnist"}}, tmp_path)}
    assert plan["mnist"].action == "download"  # an empty folder is not the dataset


def test_command_prints_the_plan_and_where_to_get_the_rest(tmp_path, capsys):
    assert main(["--profile", "paper", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cifar100: download" in out and "miniimagenet: get it yourself" in out
    assert "notMNIST_small.tar.gz" in out


def test_unknown_names_are_reported_with_the_known_ones():
    with pytest.raises(ValueError, match="'s', key 'datasets'.*not registered"):
        profile_datasets({"s": {"datasets": ["nope"]}})
    with pytest.raises(ValueError, match="benchmarks \\['nope'\\]"):
        profile_datasets({"s": {"benchmarks": ["nope"]}})
