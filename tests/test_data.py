import gzip
import struct

import pytest
import torch

from smi_plugin.data import DatasetNotFoundError, ImageSplit, load_split, scatter_objects


def test_digits_splits_are_disjoint_and_stratified():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.pixels.shape[1:] == (1, 32, 32) and train.pixels.dtype == torch.uint8
    assert torch.bincount(test.labels).min() >= 35
    images = train.images(slice(0, 4))
    assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert not any(torch.equal(test.pixels[0], p) for p in train.pixels[:200])


def write_idx_files(folder, labels: list[int]) -> None:
    """Random 28x28 images with these labels, as both IDX splits (train and t10k) in ``folder``."""
    images = torch.randint(0, 256, (len(labels), 28, 28), dtype=torch.uint8)
    labels = torch.tensor(labels, dtype=torch.uint8)
    for prefix in ("train", "t10k"):
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + struct.pack(">III", len(labels), 28, 28) + images.numpy().tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + struct.pack(">I", len(labels)) + labels.numpy().tobytes())


def test_fashion_mnist_from_a_directory_of_idx_files(tmp_path):
    write_idx_files(tmp_path, [0, 1, 2, 3, 9])
    split = load_split("fashion-mnist", "test", data_dir=tmp_path)
    assert len(split) == 5 and split.labels.tolist() == [0, 1, 2, 3, 9]
    assert split.pixels.shape == (5, 1, 32, 32) and split.class_names[9] == "Ankle boot"


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_split("fashion-mnist", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("cifar", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split("digits", "val")


def test_scatter_objects_shrinks_each_item_and_keeps_it_whole_on_the_canvas():
    white = torch.full((200, 1, 32, 32), 255, dtype=torch.uint8)
    placed = scatter_objects(white, torch.Generator().manual_seed(0), scale=(0.5, 0.5))
    lit = placed.float().div(255).flatten(1).sum(1) / 32 ** 2
    # A full white square shrunk to half the side covers a quarter of the canvas, wherever it lands.
    assert torch.allclose(lit, torch.full_like(lit, 0.25), atol=0.02)
    rows, cols = placed[:, 0].amax(2) > 0, placed[:, 0].amax(1) > 0
    assert rows.sum(1).max() <= 17 and cols.sum(1).max() <= 17
    first_row = rows.float().argmax(1)
    assert first_row.min() <= 2 and first_row.max() >= 14  # positions spread over the canvas
    again = scatter_objects(white, torch.Generator().manual_seed(0), scale=(0.5, 0.5))
    assert torch.equal(placed, again)


def test_scattered_fashion_mnist_keeps_labels_and_darkens_the_canvas(tmp_path):
    write_idx_files(tmp_path, [0, 1, 2, 3, 4, 9])
    plain = load_split("fashion-mnist", "test", data_dir=tmp_path)
    scattered = load_split("fashion-mnist-scattered", "test", data_dir=tmp_path)
    assert scattered.name == "fashion-mnist-scattered" and torch.equal(scattered.labels, plain.labels)
    # Shrinking to 45-60% of the side keeps 20-36% of the light.
    share = scattered.pixels.float().sum((1, 2, 3)) / plain.pixels.float().sum((1, 2, 3))
    assert ((share > 0.18) & (share < 0.38)).all()
    train = load_split("fashion-mnist-scattered", "train", data_dir=tmp_path)
    assert not torch.equal(train.pixels, scattered.pixels)  # each split has its own placements


def _image_folder(root, classes, sizes=((20, 30),), mode="RGB"):
    import numpy as np
    from PIL import Image

    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            array = np.full((h, w, 3), 20 * label + i, dtype=np.uint8)
            Image.fromarray(array).convert(mode).save(root / name / f"img{i}.png")


def test_image_folder_is_read_in_sorted_class_order_at_the_teachers_size(tmp_path):
    from smi_plugin.data import load_eval_data

    _image_folder(tmp_path / "val", ["zebra", "ant", "cat"], sizes=((20, 30), (64, 64)), mode="L")
    (tmp_path / "val" / "ant" / "notes.txt").write_text("not an image")
    split = load_eval_data(tmp_path / "val", (32, 48))
    assert split.class_names == ("ant", "cat", "zebra")  # sorted, as torchvision's ImageFolder
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert split.pixels.shape == (6, 3, 32, 48) and split.pixels.dtype == torch.uint8
    # Written in the order zebra, ant, cat (values 0, 20, 40); read back in sorted order.
    assert [round(split.pixels[i].float().mean().item()) for i in (0, 2, 4)] == [20, 40, 0]
    images = split.images()
    assert images.shape == (6, 3, 32, 48) and 0 <= images.min() and images.max() <= 1
    gray = load_eval_data(tmp_path / "val", 16, channels=1)
    assert gray.pixels.shape == (6, 1, 16, 16)


def test_saved_hf_dataset_with_image_and_label_columns(tmp_path):
    import datasets
    import numpy as np

    from smi_plugin.data import load_eval_data

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})
    rows = {"image": [np.full((10, 10, 3), v, dtype=np.uint8) for v in (0, 255, 128)], "label": [1, 0, 1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    split = load_eval_data(tmp_path / "ds", 8)
    assert split.class_names == ("no", "yes") and split.labels.tolist() == [1, 0, 1]
    assert split.pixels.shape == (3, 3, 8, 8) and int(split.pixels[1].min()) == 255
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                          "test": datasets.Dataset.from_dict(rows, features=features).select([0])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert len(load_eval_data(tmp_path / "dd", 8)) == 1  # the test split of a DatasetDict


def test_eval_data_errors_say_what_to_do(tmp_path):
    import datasets

    from smi_plugin.data import EvalDataError, load_eval_data

    with pytest.raises(EvalDataError, match="not found"):
        load_eval_data(tmp_path / "missing", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no class sub-folders"):
        load_eval_data(tmp_path / "empty", 32)
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="no images"):
        load_eval_data(tmp_path / "hollow", 32)
    datasets.Dataset.from_dict({"img": [1], "y": [0]}).save_to_disk(str(tmp_path / "columns"))
    with pytest.raises(EvalDataError, match="needs 'image' and 'label'"):
        load_eval_data(tmp_path / "columns", 32)
    _image_folder(tmp_path / "many", ["a", "b", "c"])
    with pytest.raises(EvalDataError, match="3 classes but the model has 2 outputs"):
        load_eval_data(tmp_path / "many", 32, num_classes=2)
    (tmp_path / "many" / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(EvalDataError, match="broken.png is not a readable image"):
        load_eval_data(tmp_path / "many", 32)
    (tmp_path / "many" / ".cache").mkdir()  # hidden folders are not classes
    (tmp_path / "many" / "b" / "broken.png").unlink()
    assert load_eval_data(tmp_path / "many", 32).class_names == ("a", "b", "c")


def test_first_keeps_the_leading_images_in_order():
    pixels = torch.arange(5 * 4, dtype=torch.uint8).reshape(5, 1, 2, 2)
    split = ImageSplit("toy", "test", pixels, torch.tensor([3, 1, 4, 1, 5]), ["c"] * 6)
    head = split.first(2)
    assert torch.equal(head.pixels, pixels[:2]) and head.labels.tolist() == [3, 1] and head.class_names == split.class_names
    assert split.first(None) is split and split.first(0) is split and split.first(9) is split
