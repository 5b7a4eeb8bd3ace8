import pytest
import torch

from smi_plugin import InversionConfig, SparseInvertedCalibrationDataset, SparseInverter
from smi_plugin.export import FORMAT, load_inverted, push_to_hub, to_hf_dataset


@pytest.fixture
def exported(tiny_vit):
    batch = SparseInverter(tiny_vit, InversionConfig(iterations=4, schedule="2:0.5"), progress=False).invert([0, 3, 9])
    manifest = {"format": FORMAT, "mean": list(batch.mean), "std": list(batch.std), "teacher": "tiny",
                "class_names": [f"c{i}" for i in range(10)], "num_classes": 10}
    return batch, to_hf_dataset([batch], manifest, items=[0])


def test_round_trip_is_bit_identical(tmp_path, exported):
    batch, dataset = exported
    dataset.save_to_disk(str(tmp_path / "ds"))
    loaded = load_inverted(tmp_path / "ds")
    data = loaded.tensors()
    assert torch.equal(data["pixel_values"], batch.images) and torch.equal(data["patch_mask"], batch.patch_mask)
    assert data["label"].tolist() == [0, 3, 9] and loaded.class_names[9] == "c9"
    calibration = SparseInvertedCalibrationDataset.from_hf(tmp_path / "ds")
    assert torch.allclose(calibration.pixel_values, batch.normalized()) and torch.equal(calibration.patch_mask, batch.patch_mask)
    preview = dataset[0]["preview"]
    assert preview.size == (32, 32) and preview.mode == "RGB"


def test_parquet_export_keeps_pixels(tmp_path, exported):
    import datasets

    batch, dataset = exported
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    back = datasets.Dataset.from_parquet(str(tmp_path / "rows.parquet")).with_format("torch")[:]
    assert torch.equal(back["pixel_values"], batch.images)


def test_push_to_hub_offline_gives_a_clear_error(monkeypatch, exported):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        push_to_hub(exported[1], "someone/inverted")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def failing_push(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise OSError("no network")

    monkeypatch.setattr(exported[1], "push_to_hub", failing_push)
    with pytest.raises(ConnectionError, match="could not push.*huggingface-cli login"):
        push_to_hub(exported[1], "someone/inverted", private=True)
    assert calls == [("someone/inverted", {"private": True, "token": None})]


def test_saved_dataset_feeds_the_kd_stream_and_calibration(tmp_path, exported):
    from smi_plugin import SparseInvertedCalibrationDataset
    from smi_plugin.distill import stream_from_inverted

    batch, dataset = exported
    dataset.save_to_disk(str(tmp_path / "ds"))
    rows = list(stream_from_inverted(tmp_path / "ds", num_shards=1).with_format("torch"))
    assert [int(r["label"]) for r in rows] == [0, 3, 9]
    assert torch.allclose(torch.stack([r["pixel_values"] for r in rows]), batch.normalized(), atol=1e-6)
    calibration = SparseInvertedCalibrationDataset.from_hf(str(tmp_path / "ds"))
    assert torch.equal(calibration.patch_mask, batch.patch_mask)


def test_hub_conventions_image_column_and_dataset_card(tmp_path, exported):
    import datasets
    import yaml

    from smi_plugin.export import write_dataset_card

    batch, dataset = exported
    dataset.save_to_disk(str(tmp_path / "ds"))
    card = write_dataset_card(tmp_path / "ds", {**load_inverted(dataset).manifest, "seed": 0}, dataset)
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded.column_names[0] == "image" and isinstance(loaded.features["image"], datasets.Image)
    assert isinstance(loaded.features["preview"], datasets.Image)
    first = loaded[0]["image"]
    assert first.size == (32, 32)
    # The full image (not the masked preview): stopped patches keep their pixels.
    assert torch.equal(torch.tensor(list(first.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1),
                       (batch.images[0] * 255).round().clamp(0, 255))
    text = card.read_text()
    assert card.name == "README.md" and text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["task_categories"] == ["image-classification"]
    meta = front["smi_plugin"]
    assert meta["teacher"] == "tiny" and meta["class_names"][9] == "c9" and meta["mean"] == list(batch.mean)
    assert meta["kept_fraction"] == pytest.approx(batch.patch_mask.float().mean().item(), abs=1e-3)
    assert "not normalized" in text
