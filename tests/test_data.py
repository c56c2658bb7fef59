"""Embedded digits domains, DomainBed folder layouts, splits and training minibatch streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlens.config import load_config
from flatlens.data import build_dataset, make_splits
from flatlens.data.digits import colored_digits, rotate, rotated_digits
from flatlens.data.folders import folder_dataset
from flatlens.data.stream import TrainBatches, iter_eval_batches
from flatlens.errors import ConfigError, DataError


def test_digits_domains_depend_on_data_seed_only():
    # Two runs with different training and trial seeds build byte-identical domains ...
    a = build_dataset(load_config(None, ["train.seed=1", "train.trial_seed=7"]).data)
    torch.manual_seed(123)  # ... whatever the global RNG holds (DomainBed's domains change with it)
    b = build_dataset(load_config(None, ["train.seed=2", "train.trial_seed=0"]).data)
    assert a.fingerprint() == b.fingerprint()
    for da, db in zip(a.domains, b.domains):
        assert torch.equal(da.images, db.images) and torch.equal(da.labels, db.labels)
    c = build_dataset(load_config(None, ["data.data_seed=1"]).data)
    assert c.fingerprint() != a.fingerprint()


def test_rotated_digits_are_disjoint_parts_of_all_images():
    from sklearn.datasets import load_digits

    ds = rotated_digits(0, 8)  # at 8x8 the 0-degree domain holds the original pixels
    assert ds.domain_names == ["0", "15", "30", "45", "60", "75"] and ds.num_classes == 10
    sizes = [len(d) for d in ds.domains]
    assert sum(sizes) == 1797 and max(sizes) - min(sizes) <= 1
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    keys = {tuple(x.flatten().tolist()): i for i, x in enumerate(raw)}
    zero = ds.domains[0].images[:, 0]
    found = [keys.get(tuple(x.flatten().tolist())) for x in zero]
    assert None not in found and len(set(found)) == len(found)
    assert ds.input_shape == (1, 8, 8)
    assert rotated_digits(0, 28).input_shape == (1, 28, 28)


def test_rotation_is_counter_clockwise_about_the_centre():
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 6] = 1.0  # right of centre
    out = rotate(img, 90)
    # counter-clockwise by 90 degrees moves "right of centre" to "above centre"
    assert out[0, 0, 2, 4] > 0.9 and out.sum() == pytest.approx(1.0, abs=0.05)
    # and equals torchvision's rotate (what DomainBed's RotatedMNIST uses) on real digits
    import torchvision.transforms.functional as TF

    digits = rotated_digits(0, 28).domains[0].images[:16]
    for angle in (15, 45, 75):
        ref = TF.rotate(digits, angle, interpolation=TF.InterpolationMode.BILINEAR)
        assert torch.allclose(rotate(digits, angle), ref, atol=1e-5)


def test_colored_digits_construction():
    ds = colored_digits(0, 16)
    assert ds.domain_names == ["+90%", "+80%", "-90%"] and ds.input_shape == (2, 16, 16)
    agree = []
    for d in ds.domains:
        color = (d.images[:, 1].flatten(1).sum(1) > 0).long()  # channel index = colour
        assert torch.all((d.images[:, 0].flatten(1).sum(1) > 0).long() == 1 - color)
        agree.append((color == d.labels).float().mean().item())
    # colour agrees with the (noisy) label with prob 1-e, e = 0.1, 0.2, 0.9 (~600 samples each)
    assert agree[0] == pytest.approx(0.9, abs=0.05)
    assert agree[1] == pytest.approx(0.8, abs=0.05)
    assert agree[2] == pytest.approx(0.1, abs=0.05)


def test_splits_disjoint_reproducible_and_trial_dependent():
    ds = rotated_digits()
    s1 = make_splits(ds, [0], 0.2, trial_seed=0)
    s2 = make_splits(ds, [0], 0.2, trial_seed=0)
    s3 = make_splits(ds, [0], 0.2, trial_seed=1)
    assert s1.fingerprint() == s2.fingerprint() != s3.fingerprint()
    for d, split in zip(ds.domains, s1.domains):
        inn, out = set(split.in_idx.tolist()), set(split.out_idx.tolist())
        assert not inn & out and len(inn | out) == len(d)
        assert len(out) == int(len(d) * 0.2)
    assert s1.train_envs == [1, 2, 3, 4, 5]
    assert s1.names()[:2] == ["env0_in", "env0_out"]
    with pytest.raises(DataError, match="names no domain"):
        make_splits(ds, [6])
    with pytest.raises(DataError, match="leaves no training domain"):
        make_splits(ds, list(range(6)))


def test_train_batches_are_a_pure_function_of_step_and_shard_over_ranks():
    ds = rotated_digits()
    splits = make_splits(ds, [0])
    full = TrainBatches(ds, splits, 8, seed=3)
    a, b = full.load(5), full.load(5)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert len(a) == 5 and all(x.shape == (8, 1, 16, 16) for x, _ in a)
    assert not torch.equal(full.load(6)[0][0], a[0][0])
    # every sample comes from the in split of a training domain
    for env, idx, _ in full.spec(5):
        assert env != 0 and set(idx.tolist()) <= set(splits.domains[env].in_idx.tolist())
    # two ranks together read exactly the one-process batch
    r0, r1 = (TrainBatches(ds, splits, 8, 3, rank=r, world_size=2).load(5) for r in (0, 1))
    for (x, _), (x0, _), (x1, _) in zip(a, r0, r1):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
    with pytest.raises(ConfigError, match="divisible by the world size"):
        TrainBatches(ds, splits, 7, 0, world_size=2)


def _make_tree(root, dataset_dir, domains, classes, n=3, size=20, ext=".jpg"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in domains:
        for c in classes:
            folder = root / dataset_dir / d / c
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"img{i}{ext}")


def test_folder_loader_reads_a_pacs_shaped_tree(tmp_path):
    _make_tree(tmp_path, "PACS", ["sketch", "photo", "cartoon", "art_painting"], ["dog", "elephant", "giraffe"])
    ds = build_dataset(load_config(None, ["data.dataset=PACS", f"data.root={tmp_path}", "data.image_size=32"]).data)
    assert ds.domain_names == ["art_painting", "cartoon", "photo", "sketch"]  # DomainBed: sorted folders
    assert ds.class_names == ["dog", "elephant", "giraffe"] and ds.num_classes == 3
    assert [len(d) for d in ds.domains] == [9, 9, 9, 9] and ds.input_shape == (3, 32, 32)
    x, y = ds.domains[1].load(torch.tensor([0, 4, 8]))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 1, 2]
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7  # ImageNet-normalised
    # augmentation: deterministic per seed, different across seeds, never on evaluation batches
    idx = torch.tensor([0, 1])
    xa, _ = ds.domains[0].load(idx, torch.tensor([5, 6]))
    xb, _ = ds.domains[0].load(idx, torch.tensor([5, 6]))
    xc, _ = ds.domains[0].load(idx, torch.tensor([7, 8]))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    (xe, _), = list(iter_eval_batches(ds.domains[0], torch.tensor([0]), 4))
    assert torch.equal(xe[0], ds.domains[0].load(torch.tensor([0]))[0][0])
    # reading whole steps in DataLoader workers gives the same batches as reading them inline
    splits = make_splits(ds, [0])
    stream = TrainBatches(ds, splits, 4, seed=0, num_workers=2)
    via_workers = list(stream.iterate(3, 5))
    inline = [stream.load(3), stream.load(4)]
    for s1, s2 in zip(via_workers, inline):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(s1, s2))


def test_generic_folders_and_missing_data_errors(tmp_path):
    _make_tree(tmp_path, "mine", ["b_dom", "a_dom"], ["x", "y"], n=2, ext=".png")
    ds = folder_dataset("folders", str(tmp_path / "mine"), image_size=16)
    assert ds.domain_names == ["a_dom", "b_dom"] and ds.num_classes == 2
    with pytest.raises(DataError) as err:
        folder_dataset("PACS", str(tmp_path), 32)
    msg = str(err.value)
    assert f"PACS not found at {tmp_path}/PACS" in msg and "art_painting, cartoon, photo, sketch" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="data.root is empty"):
        folder_dataset("VLCS", "", 32)
    (tmp_path / "office_home" / "Art").mkdir(parents=True)
    with pytest.raises(DataError, match="lacks domain folder"):
        folder_dataset("OfficeHome", str(tmp_path), 32)
