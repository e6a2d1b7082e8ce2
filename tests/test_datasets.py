"""Image reading and the real-data loaders, on tiny fixtures written here in the exact real formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cyclex.datasets import (
    ImageReadError,
    XrayDataset,
    XrayRecord,
    labels_tensor,
    load_image_batch,
    make_phantoms,
    read_chexpert_csv,
    read_image,
    read_image_folder,
    read_mimic_cxr_jpg,
    read_phantom_records,
    read_r2gen_annotation,
    write_phantom_folder,
)
from cyclex.findings import FINDINGS, LabelState

GRADIENT = np.tile(np.arange(16, dtype=np.float64) / 15.0, (12, 1))  # (12, 16), 0 .. 1 across columns


def _save(array: np.ndarray, path: Path, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)
    return path


def _write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                 intercept: float = 0.0, window: tuple[float, float] | None = None, frames: int = 1) -> Path:
    """A real DICOM file (Explicit VR Little Endian, 12 bits stored in 16) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "fixture"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- image files ---------------------------------------------------------------------------------------

def test_png_8_and_16_bit_and_jpeg(tmp_path):
    png8 = _save(np.round(GRADIENT * 255).astype(np.uint8), tmp_path / "g8.png")
    png16 = _save(np.round(GRADIENT * 65535).astype(np.uint16), tmp_path / "g16.png")
    with Image.open(png16) as check:
        assert check.mode.startswith("I")  # really 16 bit on disk
    jpeg = _save(np.round(GRADIENT * 255).astype(np.uint8), tmp_path / "g.jpg", quality=95)
    for path, tol in ((png8, 0.5 / 255), (png16, 0.5 / 65535), (jpeg, 0.04)):
        image = read_image(path)
        assert image.dtype == np.float32 and image.shape == (12, 16)
        np.testing.assert_allclose(image, GRADIENT, atol=tol)


def test_rgb_rgba_palette_become_luminance(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    expected = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255
    np.testing.assert_allclose(read_image(_save(rgb, tmp_path / "rgb.png")), expected, atol=1e-6)
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # a transparent pixel composites over black
    image = read_image(_save(rgba, tmp_path / "rgba.png", mode="RGBA"))
    np.testing.assert_allclose(image[1:, 1:], expected, atol=1e-6)
    assert image[0, 0] == 0.0
    palette = Image.fromarray(rgb).convert("P")  # the web palette moves the colour a little
    palette.save(tmp_path / "p.png")
    r, g, b = (int(v) for v in np.asarray(palette.convert("RGB"))[0, 0])
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), (0.299 * r + 0.587 * g + 0.114 * b) / 255, atol=1e-6)


def test_dicom_monochrome2_window_and_rescale(tmp_path):
    raw = np.array([[0, 100, 200], [300, 400, 4095]], np.uint16)
    # Stored 0..4095, modality value = 2 * raw - 100, window centre 300 width 401 (in modality units).
    path = _write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-100.0, window=(300.0, 401.0))
    values = 2.0 * raw - 100.0
    expected = np.clip((values - 299.5) / 400.0 + 0.5, 0, 1)  # DICOM PS3.3 C.11.2.1.2 linear window
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted_and_min_max_without_window(tmp_path):
    raw = np.array([[0, 1000], [2000, 4000]], np.uint16)
    mono2 = read_image(_write_dicom(tmp_path / "m2.dcm", raw))
    mono1 = read_image(_write_dicom(tmp_path / "m1.dcm", raw, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono2, raw / 4000.0, atol=1e-6)
    np.testing.assert_allclose(mono1, 1.0 - raw / 4000.0, atol=1e-6)
    # A DICOM without the .dcm suffix is recognised by its DICM preamble.
    renamed = tmp_path / "noext"
    renamed.write_bytes((tmp_path / "m1.dcm").read_bytes())
    np.testing.assert_allclose(read_image(renamed), mono1)


def test_bad_image_files_raise_errors_naming_the_file(tmp_path):
    good = _save(np.full((32, 32), 128, np.uint8), tmp_path / "good.png")
    data = good.read_bytes()
    cases = {}
    cases["empty.png"] = b""
    cases["truncated.png"] = data[: len(data) // 2]
    jpeg_bytes = _save(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), tmp_path / "j.jpg").read_bytes()
    cases["truncated.jpg"] = jpeg_bytes[: len(jpeg_bytes) // 2]
    cases["text.png"] = b"this is not an image at all"
    cases["broken.dcm"] = b"\x00" * 128 + b"DICM" + b"\x01\x02"
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path)
    # Wrong modes: a float TIFF outside [0, 1] and a multi-frame DICOM.
    Image.fromarray(np.full((4, 4), 7.5, np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match=r"float\.tif.*expected \[0, 1\]"):
        read_image(tmp_path / "float.tif")
    dicom = _write_dicom(tmp_path / "full.dcm", np.zeros((16, 16), np.uint16)).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(dicom[:-100])  # pixel data shorter than Rows x Columns
    with pytest.raises(ImageReadError, match=r"cut\.dcm.*pixel data"):
        read_image(tmp_path / "cut.dcm")
    (tmp_path / "header.dcm").write_bytes(dicom[:200])  # no pixel data element at all
    with pytest.raises(ImageReadError, match=r"header\.dcm.*PixelData"):
        read_image(tmp_path / "header.dcm")
    multi = _write_dicom(tmp_path / "multi.dcm", np.zeros((2, 3, 3), np.uint16), frames=2)
    with pytest.raises(ImageReadError, match=r"multi\.dcm.*2 frames"):
        read_image(multi)


def test_load_image_batch_shapes_and_errors(tmp_path):
    a = _save(np.full((20, 30), 255, np.uint8), tmp_path / "a.png")
    b = _save(np.zeros((40, 40), np.uint16), tmp_path / "b.png")
    batch = load_image_batch([a, b], size=16)
    assert batch.shape == (2, 1, 16, 16) and batch.dtype == torch.float32
    assert torch.allclose(batch[0], torch.ones(1, 16, 16)) and batch[1].max() == 0
    assert load_image_batch([a], size=(8, 12)).shape == (1, 1, 8, 12)
    with pytest.raises(ValueError, match="different sizes"):
        load_image_batch([a, b])
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="bad.png"):
        load_image_batch([a, tmp_path / "bad.png"], size=16)
    with pytest.raises(TypeError, match="single path"):
        load_image_batch(str(a), size=16)


# --- R2Gen ---------------------------------------------------------------------------------------------

def test_r2gen_iu_xray_two_views(tmp_path):
    images = tmp_path / "iu_xray" / "images"
    for study in ("CXR1_1_IM-0001", "CXR2_IM-0652"):
        for view in ("0.png", "1.png"):
            _save(np.full((10, 10), 90, np.uint8), images / study / view)
    annotation = {
        "train": [{"id": "CXR1_1_IM-0001", "report": "the heart is normal in size .",
                   "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"}],
        "val": [],
        "test": [{"id": "CXR2_IM-0652", "report": "no acute disease .",
                  "image_path": ["CXR2_IM-0652/0.png", "CXR2_IM-0652/1.png"], "split": "test"}],
    }
    ann = tmp_path / "iu_xray" / "annotation.json"
    ann.write_text(json.dumps(annotation))
    records = read_r2gen_annotation(ann)
    assert [r.id for r in records] == ["CXR1_1_IM-0001", "CXR2_IM-0652"]
    assert [r.split for r in records] == ["train", "test"]
    assert records[0].image_paths == [images / "CXR1_1_IM-0001" / "0.png", images / "CXR1_1_IM-0001" / "1.png"]
    assert records[0].meta["dataset"] == "iu_xray" and records[0].report == "the heart is normal in size ."
    assert [r.id for r in read_r2gen_annotation(ann, splits=("test",))] == ["CXR2_IM-0652"]
    # Two views per item through the Dataset: (B, V, 1, H, W).
    batch = next(iter(DataLoader(XrayDataset(records, size=8, views=2), batch_size=2)))
    assert batch["image"].shape == (2, 2, 1, 8, 8)
    assert batch["report"] == ["the heart is normal in size .", "no acute disease ."]


def test_r2gen_mimic_cxr_and_bad_annotations(tmp_path):
    rel = "p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    _save(np.full((10, 10), 10, np.uint8), tmp_path / "images" / rel)
    entry = {"id": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "study_id": 50414267, "subject_id": 10000032,
             "report": "There is no focal consolidation.", "image_path": [rel], "split": "train"}
    ann = tmp_path / "annotation.json"
    ann.write_text(json.dumps({"train": [entry], "val": [], "test": []}))
    (record,) = read_r2gen_annotation(ann, tmp_path / "images")
    assert record.meta == {"dataset": "mimic_cxr", "study_id": 50414267, "subject_id": 10000032}
    assert record.image_paths == [tmp_path / "images" / rel]

    ann.write_text(json.dumps({"train": [{**entry, "image_path": ["p10/missing.jpg"]}]}))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_r2gen_annotation(ann, tmp_path / "images")
    ann.write_text(json.dumps({"train": [{"id": "x", "image_path": [rel]}]}))
    with pytest.raises(ValueError, match=r"train\[0\].*report"):
        read_r2gen_annotation(ann, tmp_path / "images")
    ann.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_r2gen_annotation(ann)
    ann.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        read_r2gen_annotation(ann)


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------------------

def _gzip_csv(path: Path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)


def test_mimic_cxr_jpg_layout(tmp_path):
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    dicoms = [("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA"),
              ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL"),
              ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "AP")]
    for subject, study, dicom, _ in dicoms:
        _save(np.full((6, 6), 50, np.uint8), root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    header = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
              "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
              "PatientOrientationCodeSequence_CodeMeaning\n")
    rows = "".join(f"{d},{s},{st},CHEST (PA AND LAT),{v},3056,2544,21800506,213014.531,CHEST (PA AND LAT),"
                   f"postero-anterior,Erect\n" for s, st, d, v in dicoms)
    _gzip_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", header + rows)
    splits = "dicom_id,study_id,subject_id,split\n" + "".join(
        f"{d},{st},{s},{'validate' if s == '10000764' else 'train'}\n" for s, st, d, _ in dicoms)
    _gzip_csv(root / "mimic-cxr-2.0.0-split.csv.gz", splits)
    chexpert = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
                "Pneumothorax,Support Devices\n"
                "10000032,50414267,,1.0,,,,,,,,-1.0,,0.0,,\n"
                "10000764,57375967,,,,,,,,,1.0,,,,,\n")
    _gzip_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert)
    reports = tmp_path / "reports" / "files" / "p10" / "p10000032"
    reports.mkdir(parents=True)
    (reports / "s50414267.txt").write_text("FINDINGS: Enlarged heart.\n  IMPRESSION: Cardiomegaly.\n")

    records = read_mimic_cxr_jpg(root, reports_root=tmp_path / "reports" / "files")
    assert [r.id for r in records] == [d for _, _, d, _ in dicoms]
    first = records[0]
    assert first.split == "train" and first.meta["ViewPosition"] == "PA"
    assert first.labels["Cardiomegaly"] is LabelState.POSITIVE
    assert first.labels["Pleural Effusion"] is LabelState.UNCERTAIN
    assert first.labels["Pneumonia"] is LabelState.NEGATIVE and first.labels["Edema"] is LabelState.BLANK
    assert first.report == "FINDINGS: Enlarged heart. IMPRESSION: Cardiomegaly."
    assert records[2].split == "val" and records[2].report is None
    frontal = read_mimic_cxr_jpg(root, view_positions=("PA", "AP"))
    assert [r.meta["ViewPosition"] for r in frontal] == ["PA", "AP"]
    assert [r.id for r in read_mimic_cxr_jpg(root, splits=("val",))] == [dicoms[2][2]]
    with pytest.raises(FileNotFoundError, match="metadata"):
        read_mimic_cxr_jpg(tmp_path / "reports")


# --- CheXpert ------------------------------------------------------------------------------------------

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices\n")


def test_chexpert_csv(tmp_path):
    base = tmp_path / "CheXpert-v1.0-small"
    for rel in ("train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study2/view2_lateral.jpg"):
        _save(np.full((6, 6), 200, np.uint8), base / rel)
    (base / "train.csv").write_text(
        CHEXPERT_HEADER
        + "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0\n"
        + "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg,Male,41,Lateral,,,,-1.0,1.0,,,,,,,,,,\n")
    records = read_chexpert_csv(base / "train.csv")
    assert [r.split for r in records] == ["train", "train"]
    first, second = records
    assert first.image_paths == [base / "train/patient00001/study1/view1_frontal.jpg"]
    assert first.id == "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal"
    assert first.meta["Sex"] == "Female" and first.meta["Age"] == 68 and first.meta["AP/PA"] == "AP"
    assert first.meta["patient"] == "patient00001" and first.meta["study"] == "study1"
    assert first.labels["No Finding"] is LabelState.POSITIVE
    assert first.labels["Pneumothorax"] is LabelState.NEGATIVE
    assert first.labels["Support Devices"] is LabelState.POSITIVE
    assert second.labels["Cardiomegaly"] is LabelState.UNCERTAIN and second.labels["Lung Opacity"] is LabelState.POSITIVE
    assert "AP/PA" not in second.meta  # blank cells are left out
    assert [r.meta["patient"] for r in read_chexpert_csv(base / "train.csv", frontal_only=True)] == ["patient00001"]
    codes = labels_tensor(second)
    assert codes[FINDINGS.index("Cardiomegaly")] == -1 and torch.isnan(codes[FINDINGS.index("Edema")])
    (base / "valid.csv").write_text(CHEXPERT_HEADER + "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
                                    + ",Male,73,Frontal,AP" + ",0.0" * 14 + "\n")
    with pytest.raises(FileNotFoundError, match="patient64541"):
        read_chexpert_csv(base / "valid.csv")
    assert read_chexpert_csv(base / "valid.csv", check_files=False)[0].split == "val"
    (base / "bad.csv").write_text("Image,Label\nx.jpg,1\n")
    with pytest.raises(ValueError, match="no 'Path' column"):
        read_chexpert_csv(base / "bad.csv")
    (base / "badvalue.csv").write_text(CHEXPERT_HEADER.replace("\n", "") + "\n"
                                       + "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,1,Frontal,AP,"
                                       + "2.0" + ",0.0" * 13 + "\n")
    with pytest.raises(ValueError, match="No Finding"):
        read_chexpert_csv(base / "badvalue.csv")


# --- plain folders and phantom folders -----------------------------------------------------------------

def test_plain_folder_and_folder_with_csv(tmp_path):
    _save(np.full((5, 5), 10, np.uint8), tmp_path / "imgs" / "b.png")
    _save(np.full((5, 5), 20, np.uint8), tmp_path / "imgs" / "sub" / "a.jpg")
    _write_dicom(tmp_path / "imgs" / "c.dcm", np.full((5, 5), 7, np.uint16))
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    records = read_image_folder(tmp_path / "imgs")
    assert [r.id for r in records] == ["b", "c", "sub/a"]
    assert all(r.report is None and r.labels is None for r in records)

    (tmp_path / "list.csv").write_text("image,report,cardiomegaly,Pleural Effusion,split,site\n"
                                       "b.png,Enlarged heart.,1,0,train,A\n"
                                       "sub/a.jpg,No effusion.,,-1,valid,B\n")
    records = read_image_folder(tmp_path / "imgs", tmp_path / "list.csv")
    assert [r.id for r in records] == ["b", "sub/a"]
    assert records[0].report == "Enlarged heart." and records[0].labels["Cardiomegaly"] is LabelState.POSITIVE
    assert records[1].labels["Pleural Effusion"] is LabelState.UNCERTAIN and records[1].split == "val"
    assert records[1].meta == {"site": "B"}
    (tmp_path / "nocol.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no image column"):
        read_image_folder(tmp_path / "imgs", tmp_path / "nocol.csv")
    (tmp_path / "missing.csv").write_text("path\nnope.png\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image_folder(tmp_path / "imgs", tmp_path / "missing.csv")


def test_phantom_folder_as_records_and_dataset(tmp_path):
    phantoms = make_phantoms(3, seed=4)
    folder = write_phantom_folder(phantoms, tmp_path / "ph")
    records = read_phantom_records(folder)
    assert [r.id for r in records] == [p.id for p in phantoms]
    assert all(r.labels == p.labels and r.report == p.report for r, p in zip(records, phantoms, strict=True))
    loader = DataLoader(XrayDataset(records, size=64), batch_size=3)
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 64, 64) and batch["labels"].shape == (3, len(FINDINGS))
    expected = torch.from_numpy(np.stack([np.round(p.image * 255) / 255 for p in phantoms]))[:, None]
    assert torch.allclose(batch["image"], expected.float(), atol=1e-6)


def test_record_and_dataset_validation(tmp_path):
    with pytest.raises(ValueError, match="no image paths"):
        XrayRecord(id="x", image_paths=[])
    with pytest.raises(ValueError, match="views"):
        XrayDataset([], views=0)
    (tmp_path / "z.png").write_bytes(b"")
    dataset = XrayDataset([XrayRecord(id="z", image_paths=[tmp_path / "z.png"])])
    with pytest.raises(ImageReadError, match="z.png"):
        dataset[0]
