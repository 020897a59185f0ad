"""Folder datasets: both layouts, bad files (skip / error), imbalance warning, split determinism,
the loader's batches and sharding, and a real 1-epoch CLI run on a tiny PNG folder."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_png_tree
from transferlab.config import DataConfig
from transferlab.data.folder import (
    FolderLoader,
    check_image,
    decode_rgb,
    load_folder_dataset,
    load_image,
    shard_indices,
    stratified_split,
)
from transferlab.errors import UserError
from transferlab.plan import square_preprocessing


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset=f"folder:{root}", num_workers=0, **kw)


def test_single_tree_stratified_split_is_deterministic(tmp_path):
    root = write_png_tree(tmp_path / "d", {"cat": 20, "dog": 10})
    a = load_folder_dataset(_cfg(root, val_frac=0.2, test_frac=0.2, split_seed=3))
    b = load_folder_dataset(_cfg(root, val_frac=0.2, test_frac=0.2, split_seed=3))
    c = load_folder_dataset(_cfg(root, val_frac=0.2, test_frac=0.2, split_seed=4))
    assert a.classes == ["cat", "dog"]
    assert a.info["layout"] == "tree"
    assert a.info["class_counts"]["val"] == {"cat": 4, "dog": 2}  # stratified: 20% of each class
    assert a.info["class_counts"]["test"] == {"cat": 4, "dog": 2}
    assert (len(a.train), len(a.val), len(a.test)) == (18, 6, 6)
    assert a.val.paths == b.val.paths and a.md5 == b.md5
    assert a.val.paths != c.val.paths
    assert not set(a.train.paths) & set(a.val.paths) and not set(a.val.paths) & set(a.test.paths)
    assert a.source == str(root.resolve()) and len(a.md5["files"]) == 32


def test_stratified_split_keeps_one_per_small_class():
    parts = stratified_split([0] * 3 + [1] * 50, (0.1, 0.1), seed=0)
    assert [sum(1 for i in p if i < 3) for p in parts] == [1, 1, 1]
    assert sorted(i for p in parts for i in p) == list(range(53))


def test_split_layout_uses_given_splits_and_carves_missing_val(tmp_path):
    write_png_tree(tmp_path / "d" / "train", {"a": 10, "b": 10})
    write_png_tree(tmp_path / "d" / "test", {"a": 2, "b": 3}, seed=1)
    ds = load_folder_dataset(_cfg(tmp_path / "d", val_frac=0.2))
    assert ds.info["layout"] == "splits"
    assert len(ds.test) == 5 and all("/test/" in p for p in ds.test.paths)
    assert len(ds.val) == 4 and all("/train/" in p for p in ds.val.paths)
    assert len(ds.train) == 16


def test_unknown_class_in_test_is_an_error(tmp_path):
    write_png_tree(tmp_path / "d" / "train", {"a": 4, "b": 4})
    write_png_tree(tmp_path / "d" / "test", {"zebra": 2})
    with pytest.raises(UserError, match="zebra"):
        load_folder_dataset(_cfg(tmp_path / "d"))


def _add_bad_files(root: Path) -> list[Path]:
    corrupt = root / "cat" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    text = root / "dog" / "notes.txt"
    text.write_text("not an image")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored, not counted
    return [corrupt, text]


def test_bad_images_skipped_with_warning_and_count(tmp_path, caplog):
    root = write_png_tree(tmp_path / "d", {"cat": 10, "dog": 10})
    bad = _add_bad_files(root)
    with caplog.at_level(logging.WARNING):
        ds = load_folder_dataset(_cfg(root))
    assert ds.info["bad_images"] == 2
    assert sorted(ds.info["bad_image_paths"]) == sorted(str(p) for p in bad)
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text
    all_paths = ds.train.paths + ds.val.paths + ds.test.paths
    assert len(all_paths) == 20 and not any("broken" in p for p in all_paths)


def test_bad_images_error_policy_lists_paths(tmp_path):
    root = write_png_tree(tmp_path / "d", {"cat": 6, "dog": 6})
    _add_bad_files(root)
    with pytest.raises(
        UserError, match=r"2 unreadable.*broken\.png.*notes\.txt.*--on-bad-image skip"
    ):
        load_folder_dataset(_cfg(root, on_bad_image="error"))


def test_imbalance_ratio_is_recorded(tmp_path):
    root = write_png_tree(tmp_path / "d", {"big": 44, "small": 4}, size=4)
    ds = load_folder_dataset(_cfg(root))
    assert ds.info["imbalance_ratio"] == 11.0  # the run's --balance hint: tests/test_userdata.py


def test_missing_folder_and_single_class_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_folder_dataset(_cfg(tmp_path / "nope"))
    write_png_tree(tmp_path / "one", {"only": 5})
    with pytest.raises(UserError, match="at least 2"):
        load_folder_dataset(_cfg(tmp_path / "one"))


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 5:15] = 255  # a white centre band, 10 px wide, in a 20 px wide image
    Image.fromarray(arr).save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert x.float().mean() > 200  # the crop kept the centre band


def test_exif_orientation_is_applied_where_images_are_decoded(tmp_path):
    """A phone's portrait JPEG: stored sideways (20 wide, 10 high) with EXIF orientation 6."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # stored: red left half, blue right half
    arr[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    up = np.asarray(decode_rgb(tmp_path / "phone.jpg"))
    assert up.shape == (20, 10, 3)  # upright: 10 wide, 20 high
    assert up[2, 5, 0] > 200 and up[2, 5, 2] < 60  # red on top
    assert up[17, 5, 2] > 200 and up[17, 5, 0] < 60  # blue below
    x = load_image(tmp_path / "phone.jpg", 10)  # train, predict, explain, reports
    assert x.shape == (3, 10, 10)
    assert x[0, 0, 5] > 200 and x[2, 9, 5] > 200  # red on top, blue below: upright
    assert check_image(str(tmp_path / "phone.jpg")) == ""  # check-data and the screen


def test_loader_batches_labels_and_augment(tmp_path):
    root = write_png_tree(tmp_path / "d", {"a": 7, "b": 6}, size=6)
    ds = load_folder_dataset(_cfg(root, val_frac=0.1, test_frac=0.1))
    ds.set_preprocessing(square_preprocessing(8))
    seen = []
    aug = lambda x, g: torch.flip(x, dims=[3]) if g is not None else x  # noqa: E731
    loader = FolderLoader(
        ds.train, 5, True, torch.device("cpu"), seed=1, augment=aug, num_workers=0
    )  # 9 training images: batches of 5 and 4 (a lone last sample would be dropped)
    loader.set_epoch(2)
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8) and y.dtype == torch.int64
        seen += y.tolist()
    assert len(loader) == 2 and sorted(seen) == sorted(ds.train.labels.tolist())
    assert torch.equal(loader.labels, ds.train.labels)
    ev = loader.eval_view()
    assert [y for _, y in ev][0].tolist() == ds.train.labels[:5].tolist()  # in order


def test_shard_indices_match_distributed_sampler_semantics():
    shards = [shard_indices(10, True, 0, 1, r, 3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to 12 = 3 x 4
    assert set(sum(shards, [])) == set(range(10))
    assert shards == [shard_indices(10, True, 0, 1, r, 3) for r in range(3)]
    assert shard_indices(10, True, 0, 2, 0, 3) != shards[0]  # new epoch, new order
    assert [shard_indices(10, False, 0, 0, r, 3) for r in range(3)] == [
        [0, 3, 6, 9],
        [1, 4, 7],
        [2, 5, 8],
    ]


def test_cli_trains_on_a_png_folder_and_records_bad_images(tmp_path):
    from transferlab.cli import main

    root = write_png_tree(tmp_path / "d", {"red": 12, "green": 12, "blue": 12})
    (root / "red" / "bad.jpg").write_bytes(b"nope")
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            f"folder:{root}",
            "--model",
            "cnn",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--num-workers",
            "1",
            "--val-frac",
            "0.2",
            "--test-frac",
            "0.2",
            "--run-dir",
            str(run),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    s = json.loads((run / "summary.json").read_text())
    assert s["data"]["folder"]["bad_images"] == 1
    assert s["data"]["folder"]["class_counts"]["test"] == {"blue": 2, "green": 2, "red": 2}
    assert s["image_size"] == 32 and s["data"]["source"] == str(root.resolve())
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert len(manifest["test"]["paths"]) == 6 and manifest["classes"] == ["blue", "green", "red"]


# ---------------------------------------------------------------------------------------------
# Issue 16: layouts without surprises, bad entries of every kind, bit depths, pixel limits


def test_a_class_named_train_does_not_make_a_split_layout(tmp_path, caplog):
    from transferlab.data.folder import detect_layout

    root = write_png_tree(tmp_path / "d", {"apple": 5, "train": 5, "tulip": 5}, size=4)
    with caplog.at_level(logging.INFO):
        ds = load_folder_dataset(_cfg(root))
    assert ds.info["layout"] == "tree" and ds.classes == ["apple", "train", "tulip"]
    assert "beside other folders" in ds.info["layout_reason"] and "tree layout" in caplog.text
    # only train/ and test/ on top, but train/ holds images: classes named train and test
    write_png_tree(tmp_path / "e", {"train": 4, "test": 4}, size=4)
    assert detect_layout(tmp_path / "e")[0] == "tree"
    write_png_tree(tmp_path / "f" / "train", {"a": 4, "b": 4}, size=4)
    assert detect_layout(tmp_path / "f") == (
        "splits",
        "only train folders, with class folders inside",
    )


def test_empty_folder_path_is_an_error(tmp_path):
    with pytest.raises(UserError, match="needs a path"):
        load_folder_dataset(DataConfig(dataset="folder:", num_workers=0))
    with pytest.raises(UserError, match="no such user"):
        load_folder_dataset(DataConfig(dataset="folder:~no_such_user_xyz/d", num_workers=0))


def test_broken_symlinks_and_fifos_are_counted_and_listed(tmp_path):
    root = write_png_tree(tmp_path / "d", {"cat": 6, "dog": 6}, size=4)
    (root / "cat" / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(root / "dog" / "pipe.png")  # reading it would block forever: must never be opened
    ds = load_folder_dataset(_cfg(root))
    reasons = {Path(p).name for p in ds.info["bad_image_paths"]}
    assert ds.info["bad_images"] == 2 and reasons == {"gone.png", "pipe.png"}


def test_fifo_and_device_are_refused_not_read(tmp_path):
    from transferlab.data.folder import check_regular_file

    os.mkfifo(tmp_path / "p.jpg")
    with pytest.raises(ValueError, match="FIFO"):
        load_image(tmp_path / "p.jpg", 8)
    with pytest.raises(ValueError, match="device"):
        check_regular_file("/dev/zero")


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    ramp16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0..65520
    Image.fromarray(ramp16).save(tmp_path / "g16.png")  # 16-bit grayscale PNG
    x = load_image(tmp_path / "g16.png", 8)
    expected = np.round(ramp16 / 257.0).astype(np.uint8)
    assert np.abs(x[0].numpy().astype(int) - expected.astype(int)).max() <= 2  # resize rounding
    assert x.max() > 200  # clipping would have made almost everything 255
    f = np.arange(64, dtype=np.float32).reshape(8, 8) / 63.0
    Image.fromarray(f, "F").save(tmp_path / "f.tif")
    assert abs(int(load_image(tmp_path / "f.tif", 8)[0, 0, 0]) - 0) <= 2
    Image.fromarray(f * 500, "F").save(tmp_path / "bad.tif")  # outside [0, 1]: no faithful mapping
    with pytest.raises(ValueError, match="outside"):
        load_image(tmp_path / "bad.tif", 8)


def test_images_over_the_pixel_limit_are_skipped_without_pil_warnings(tmp_path, caplog, recwarn):
    root = write_png_tree(tmp_path / "d", {"a": 5, "b": 5}, size=4)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "a" / "big.png")
    with caplog.at_level(logging.WARNING):
        ds = load_folder_dataset(_cfg(root, max_image_pixels=1000))
    assert (
        ds.info["bad_images"] == 1
        and "50x40 = 2,000 pixels is above --max-image-pixels 1,000" in caplog.text
    )
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]


def test_an_image_corrupted_after_the_check_is_one_line(tmp_path):
    root = write_png_tree(tmp_path / "d", {"a": 6, "b": 6}, size=6)
    ds = load_folder_dataset(_cfg(root, val_frac=0.2, test_frac=0.2))
    ds.set_preprocessing(8)
    Path(ds.train.paths[0]).write_bytes(b"garbage")
    loader = FolderLoader(ds.train, 4, False, torch.device("cpu"), num_workers=1)
    with pytest.raises(UserError) as e:
        list(loader)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert ds.train.paths[0] in str(e.value)


def test_a_training_batch_of_one_sample_is_dropped(tmp_path):
    root = write_png_tree(tmp_path / "d", {"a": 8, "b": 8}, size=4)
    ds = load_folder_dataset(_cfg(root, val_frac=0.1, test_frac=0.1))
    ds.set_preprocessing(8)
    n = len(ds.train)  # 14 = 3 x 4 + 2: nothing to drop; 13 with batch 4 leaves one
    loader = FolderLoader(ds.train, n - 1, True, torch.device("cpu"), num_workers=0)
    sizes = [len(y) for _, y in loader]
    assert sizes == [n - 1] and len(loader) == 1  # the lone last sample is not a batch
    ev = loader.eval_view()  # evaluation keeps every sample
    assert sum(len(y) for _, y in ev) == n
    keep = FolderLoader(ds.train, n - 2, True, torch.device("cpu"), num_workers=0)
    assert [len(y) for _, y in keep] == [n - 2, 2]
