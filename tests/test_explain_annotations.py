"""Annotation readers: mask PNGs, MS-CXR box CSVs, REFLACX ellipse / chest-box CSVs, heatmaps."""

import numpy as np
import pytest
from PIL import Image

from cyclex.explain.annotations import (
    boxes_to_mask,
    ellipses_to_mask,
    finding_name,
    load_annotation_set,
    read_box_csv,
    read_chest_box_csv,
    read_ellipse_csv,
    read_heatmap,
    read_mask_png,
)


def test_mask_png_roundtrip_and_resize(tmp_path):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 4:8] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    read = read_mask_png(tmp_path / "m.png")
    assert read.dtype == bool and read.sum() == 16
    small = read_mask_png(tmp_path / "m.png", size=(4, 4))
    assert small.tolist() == [[False] * 4, [False, False, True, True], [False, False, True, True], [False] * 4]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_mask_png(tmp_path / "missing.png")


def test_ms_cxr_box_csv(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text(
        "dicom_id,category_name,label_text,x,y,w,h,image_width,image_height\n"
        "img1,Cardiomegaly,enlarged heart,100,200,300,100,1000,1000\n"
        "img1,Cardiomegaly,enlarged heart,0,0,100,100,1000,1000\n"
        "img2,Pleural Effusion,effusion,500,500,500,500,1000,1000\n"
    )
    boxes = read_box_csv(path)
    assert [b.finding for b in boxes] == ["Cardiomegaly", "Cardiomegaly", "Pleural Effusion"]
    mask = boxes_to_mask([b for b in boxes if b.image_id == "img1"], size=(10, 10))
    expected = np.zeros((10, 10), dtype=bool)
    expected[2:3, 1:4] = True  # x 100..400 -> cols 1..4, y 200..300 -> row 2
    expected[0:1, 0:1] = True
    assert np.array_equal(mask, expected)
    bad = tmp_path / "bad.csv"
    bad.write_text("dicom_id,category_name,x,y,w,h,image_width,image_height\nimg,Edema,1,2,oops,4,10,10\n")
    with pytest.raises(ValueError, match="column 'w' row 2 must be a number"):
        read_box_csv(bad)


def test_reflacx_ellipse_csv(tmp_path):
    path = tmp_path / "anomaly_location_ellipses.csv"
    path.write_text(
        "xmin,ymin,xmax,ymax,certainty,Enlarged cardiac silhouette,Atelectasis,dicom_id\n"
        "2,2,8,6,4,True,False,img1\n"
        "0,0,2,2,1,False,True,img1\n"
    )
    ellipses = read_ellipse_csv(path)
    assert ellipses[0].findings == ("Cardiomegaly",) and ellipses[1].findings == ("Atelectasis",)
    mask = ellipses_to_mask(ellipses, size=(10, 10), finding="Cardiomegaly")
    # centre (x 5, y 4), radii 3 and 2: pixel centres inside (x+0.5-5)^2/9 + (y+0.5-4)^2/4 < 1
    yy, xx = np.mgrid[0:10, 0:10]
    expected = ((xx + 0.5 - 5) ** 2 / 9 + (yy + 0.5 - 4) ** 2 / 4) < 1
    assert np.array_equal(mask, expected)
    # certainty filter and scaling from the original image size
    assert not ellipses_to_mask(ellipses, (10, 10), finding="Atelectasis", min_certainty=2).any()
    scaled = ellipses_to_mask(ellipses, (5, 5), finding="Cardiomegaly", original_size=(10, 10))
    assert scaled.any() and scaled.shape == (5, 5)


def test_chest_box_csv_and_finding_names(tmp_path):
    path = tmp_path / "chest_bounding_box.csv"
    path.write_text("xmin,ymin,xmax,ymax\n10.2,20,90,80.5\n")
    assert read_chest_box_csv(path) == (10, 20, 90, 81)
    assert read_chest_box_csv(path, size=(50, 50), original_size=(100, 100)) == (5, 10, 45, 41)
    assert finding_name("Enlarged cardiac silhouette") == "Cardiomegaly"
    assert finding_name("Effusion") == "Pleural Effusion"
    assert finding_name("Hiatal hernia") == "Hiatal hernia"


def test_heatmaps_npy_and_png(tmp_path):
    heat = np.arange(16, dtype=np.float64).reshape(4, 4)
    np.save(tmp_path / "h.npy", heat)
    read = read_heatmap(tmp_path / "h.npy")
    assert read.min() == 0.0 and read.max() == 1.0 and read[0, 1] == pytest.approx(1 / 15)
    Image.fromarray((heat * 10).astype(np.uint8)).save(tmp_path / "h.png")
    assert np.allclose(read_heatmap(tmp_path / "h.png"), read)
    assert read_heatmap(tmp_path / "h.npy", size=(2, 2)).shape == (2, 2)
    np.save(tmp_path / "nan.npy", np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        read_heatmap(tmp_path / "nan.npy")


def test_annotation_set_from_folder_and_csv(tmp_path):
    folder = tmp_path / "ann"
    folder.mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:4] = 1
    Image.fromarray(mask * 255).save(folder / "img1__cardiomegaly.png")
    np.save(folder / "img1.npy", np.eye(8))
    annotations = load_annotation_set(folder)
    assert annotations.mask("img1", "Cardiomegaly", (8, 8)).sum() == 32
    assert annotations.mask("img1", "Edema", (8, 8)) is None
    assert annotations.heatmap("img1", "Edema", (8, 8)).trace() == 8.0
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("image_id,label_text,x,y,w,h,image_width,image_height\nimg1,effusion,0,0,4,4,8,8\n")
    from_csv = load_annotation_set(csv_path)
    assert from_csv.mask("img1", "Pleural Effusion", (8, 8)).sum() == 16
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a box CSV"):
        load_annotation_set(other)
