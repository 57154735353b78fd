"""Dock builds from sources other than a local GeoTIFF, cancellation with resume, and bad input.

The XYZ layer is served from ``file://`` PNG tiles cut from a shared raster, so the cloned-provider
path runs without a network.
"""

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import pytest
from dock_testing import wait_for_tasks, wait_until
from osgeo import gdal, osr
from qgis.core import Qgis, QgsApplication, QgsProject, QgsRasterLayer, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from lookalike.core.encoder import default_model_path
from lookalike.core.errors import LookalikeError
from lookalike.core.index import TileIndex
from lookalike.core.pipeline import BuildParameters, build_index
from lookalike.gis.raster_layers import ProviderBlockReader, rasters_folder_for, source_spec_for_layer
from lookalike.gis.tasks import TaskOutcome
from lookalike.ui.dock import EXTENT_MAP_VIEW

SHIPS_RASTER = Path("geo/planet/1056417_2017-03-08_RE3_3A_Visual_clip.tif")
LARGE_RASTER = Path("geo/planet/difference.tif")
NAIP_RASTER = Path("geo/naip_timeseries/m_4709963_se_14_1_20200831.tif")
NAIP_2009_RASTER = Path("geo/naip_timeseries/m_4709963_se_14_1_20090818.tif")
WEB_MERCATOR_HALF_WIDTH_M = 20037508.342789244
XYZ_ZOOM = 15


def xyz_tile_bounds(zoom: int, x: int, y: int):
    size = 2 * WEB_MERCATOR_HALF_WIDTH_M / 2**zoom
    xmin = -WEB_MERCATOR_HALF_WIDTH_M + x * size
    ymax = WEB_MERCATOR_HALF_WIDTH_M - y * size
    return xmin, ymax - size, xmin + size, ymax


def write_xyz_tiles(raster: Path, folder: Path, zoom: int):
    """Cut 256 px PNG tiles {z}/{x}/{y}.png covering ``raster``; return the covered EPSG:3857 bounds."""
    dataset = gdal.Open(str(raster))
    source_ref = dataset.GetSpatialRef()
    source_ref.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    mercator = osr.SpatialReference()
    mercator.ImportFromEPSG(3857)
    mercator.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    origin_x, pixel_x, _, origin_y, _, pixel_y = dataset.GetGeoTransform()
    corners = (origin_x, origin_y + pixel_y * dataset.RasterYSize, origin_x + pixel_x * dataset.RasterXSize, origin_y)
    xmin, ymin, xmax, ymax = osr.CoordinateTransformation(source_ref, mercator).TransformBounds(*corners, 21)
    tile_size = 2 * WEB_MERCATOR_HALF_WIDTH_M / 2**zoom
    columns = range(math.floor((xmin + WEB_MERCATOR_HALF_WIDTH_M) / tile_size),
                    math.floor((xmax + WEB_MERCATOR_HALF_WIDTH_M) / tile_size) + 1)
    rows = range(math.floor((WEB_MERCATOR_HALF_WIDTH_M - ymax) / tile_size),
                 math.floor((WEB_MERCATOR_HALF_WIDTH_M - ymin) / tile_size) + 1)
    for x in columns:
        for y in rows:
            path = folder / str(zoom) / str(x) / f"{y}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            warped = gdal.Warp("", dataset, format="MEM", outputBounds=xyz_tile_bounds(zoom, x, y), width=256,
                               height=256, dstSRS="EPSG:3857", dstAlpha=True)
            gdal.Translate(str(path), warped, format="PNG")
    return xmin, ymin, xmax, ymax


def show_layer(canvas, layer, extent=None) -> None:
    QgsProject.instance().addMapLayer(layer)
    canvas.resize(700, 340)
    # A hidden canvas keeps its initial map size; showing its window applies the new size.
    canvas.window().show()
    canvas.setDestinationCrs(layer.crs())
    canvas.setLayers([layer])
    canvas.setExtent(extent or layer.extent())
    canvas.refresh()
    QgsApplication.processEvents()


def test_xyz_layer_indexed_through_cloned_provider(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    bounds = write_xyz_tiles(shared_data / SHIPS_RASTER, tmp_path / "tiles", XYZ_ZOOM)
    url = (tmp_path / "tiles").as_uri() + "/{z}/{x}/{y}.png"
    # zmin = zmax makes QGIS read the only zoom level written, whatever the requested resolution.
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin={XYZ_ZOOM}&zmax={XYZ_ZOOM}", "ships xyz", "wms")
    assert layer.isValid()
    from qgis.core import QgsRectangle

    show_layer(qgis_canvas, layer, QgsRectangle(*bounds))
    dock.raster_combo.setLayer(layer)
    assert not any(combo.isEnabled() for combo in dock.band_combos)

    spec = source_spec_for_layer(layer)
    assert not spec.uses_gdal
    assert spec.provider is not layer.dataProvider()
    values, valid = ProviderBlockReader(spec.provider, "ships xyz").read(bounds, layer.crs().toWkt(), 64, 32)
    assert values.shape == (3, 32, 64)
    assert valid.mean() > 0.5

    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData(EXTENT_MAP_VIEW))
    dock.gsd_spin.setValue(5.0)
    folder = tmp_path / "xyz_index"
    dock.index_folder.setFilePath(str(folder))
    task = dock.start_build()
    assert task is not None
    wait_for_tasks(dock)

    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert dock.index is not None
    assert dock.index.count > 20
    written = list(rasters_folder_for(str(folder)).glob("*.tif"))
    assert len(written) == 1
    assert dock.index.sources[0]["path"] == str(written[0])
    # The written raster is in the local UTM zone, so the GSD is in ground metres.
    assert "UTM zone 10N" in dock.index.sources[0]["crs_wkt"]

    dock.k_spin.setValue(5)
    dock.activate_tool("point")
    centre = qgis_canvas.getCoordinateTransform().transform(qgis_canvas.extent().center())
    QTest.mouseClick(qgis_canvas.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(round(centre.x()), round(centre.y())))
    wait_for_tasks(dock)
    assert dock.result_layer() is not None
    assert dock.result_layer().featureCount() == 5


def test_xyz_whole_layer_extent_is_rejected(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    write_xyz_tiles(shared_data / SHIPS_RASTER, tmp_path / "tiles", XYZ_ZOOM)
    url = (tmp_path / "tiles").as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin={XYZ_ZOOM}&zmax={XYZ_ZOOM}", "ships xyz", "wms")
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)
    dock.index_folder.setFilePath(str(tmp_path / "index"))

    assert dock.start_build() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("covers the whole world" in text for text in warnings)


def test_build_cancel_then_resume(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    layer = QgsRasterLayer(str(shared_data / LARGE_RASTER), "difference")
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)
    dock.overlap_spin.setValue(0)
    dock.gsd_spin.setValue(3.1)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    task = dock.start_build()
    progress = []
    task.tileProgress.connect(progress.append)
    wait_until(lambda: any(item.tiles_done > 0 for item in progress))
    QTest.mouseClick(dock.cancel_button, Qt.MouseButton.LeftButton)
    wait_for_tasks(dock)

    assert task.outcome is TaskOutcome.CANCELLED
    assert dock.index is None
    assert "cancelled" in dock.status_label.text()
    assert dock.build_button.isEnabled()
    tiles_total = progress[-1].tiles_total
    assert progress[-1].tiles_done < tiles_total

    resumed = dock.run_build(dock.last_build_request)
    wait_for_tasks(dock, timeout_s=600)
    assert resumed.outcome is TaskOutcome.SUCCEEDED
    assert resumed.result.tiles_resumed > 0
    assert resumed.result.tiles_total == tiles_total
    assert dock.index is not None
    # The time in the message is the resumed run's, so the message names where that run started.
    successes = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    assert any(f"Index built (resumed at tile {resumed.result.tiles_resumed} of {tiles_total}):" in text
               for text in successes)


def test_build_without_folder_warns(dock, shared_data, qgis_canvas, qgis_iface):
    layer = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)
    dock.index_folder.setFilePath("")

    assert dock.start_build() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("No index folder is set" in text for text in warnings)


def test_map_view_beside_raster_warns_before_build(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    layer = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    extent = layer.extent()
    show_layer(qgis_canvas, layer, QgsRectangle(extent.xMaximum() + 5000, extent.yMinimum(),
                                                extent.xMaximum() + 8000, extent.yMaximum()))
    dock.raster_combo.setLayer(layer)
    dock.extent_combo.setCurrentIndex(dock.extent_combo.findData(EXTENT_MAP_VIEW))
    dock.index_folder.setFilePath(str(tmp_path / "index"))

    assert dock.start_build() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("The map view does not cover the raster 'ships'" in text for text in warnings), warnings
    assert not (tmp_path / "index").exists()


def test_empty_mask_layer_warns(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    layer = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)
    mask = QgsVectorLayer("Polygon?crs=EPSG:32610", "clouds", "memory")
    QgsProject.instance().addMapLayer(mask)
    dock.mask_combo.setLayer(mask)
    dock.gsd_spin.setValue(20.0)
    dock.index_folder.setFilePath(str(tmp_path / "index"))

    assert dock.start_build() is not None
    wait_for_tasks(dock)

    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("The mask layer 'clouds' has no polygons, so this build masks nothing" in text for text in warnings)


def test_relative_index_folder_needs_a_project_folder(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    choose_raster(dock, qgis_canvas, shared_data / SHIPS_RASTER, "ships")
    dock.index_folder.setFilePath("relative_dir")

    assert dock.start_build() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("'relative_dir' is a relative path and the project has no folder yet" in text for text in warnings)

    # Once the project has a folder, the index goes there.
    assert QgsProject.instance().write(str(tmp_path / "survey.qgz"))
    dock.index_folder.setFilePath("relative_dir")
    dock.gsd_spin.setValue(20.0)
    dock.start_build()
    wait_for_tasks(dock)
    assert dock.index_folder.filePath() == str(tmp_path / "relative_dir")
    assert (tmp_path / "relative_dir" / "manifest.json").is_file()


def test_relative_folder_opens_from_project_folder(dock, shared_data, tmp_path, qgis_canvas, monkeypatch):
    # An index of the same name in QGIS's working directory must not be the one that opens.
    working = tmp_path / "working"
    build_index(BuildParameters(source_paths=(str(shared_data / SHIPS_RASTER),), index_folder=str(working / "idx"),
                                encoder_path=str(dock.encoder_path()), tile_size_source_px=64))
    project_folder = tmp_path / "project"
    build_index(BuildParameters(source_paths=(str(shared_data / SHIPS_RASTER),),
                                index_folder=str(project_folder / "idx"), encoder_path=str(dock.encoder_path()),
                                tile_size_source_px=32))
    assert QgsProject.instance().write(str(project_folder / "survey.qgz"))
    monkeypatch.chdir(working)

    dock.index_folder.setFilePath("idx")
    wait_for_tasks(dock)

    assert dock.index is not None
    assert Path(dock.index.folder) == project_folder / "idx"


def test_band_choice_reaches_index(dock, shared_data, tmp_path, qgis_canvas):
    choose_raster(dock, qgis_canvas, shared_data / NAIP_RASTER, "naip", tmp_path / "index")
    dock.gsd_spin.setValue(40.0)
    # Near infrared, red, green: a false-colour mapping of the 4-band NAIP scene.
    for combo, band in zip(dock.band_combos, (4, 1, 2)):
        combo.setBand(band)

    dock.start_build()
    wait_for_tasks(dock)

    assert [combo.count() for combo in dock.band_combos] == [5, 5, 5]
    assert dock.index is not None
    assert dock.index.sources[0]["band_indexes"] == [4, 1, 2]


def test_auto_band_warning_names_the_bands_row(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    # The 4-band NAIP scene has no colour interpretation, so the engine warns which bands it reads.
    choose_raster(dock, qgis_canvas, shared_data / NAIP_RASTER, "naip", tmp_path / "index")
    dock.gsd_spin.setValue(40.0)

    dock.start_build()
    wait_for_tasks(dock)

    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    band_warnings = [text for text in warnings if "are read as the encoder's red, green, blue" in text]
    assert band_warnings
    assert all("(In this panel band_indexes is the Bands row.)" in text for text in band_warnings)


def test_partial_band_choice_warns(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    choose_raster(dock, qgis_canvas, shared_data / NAIP_RASTER, "naip", tmp_path / "index")
    dock.band_combos[0].setBand(4)

    assert dock.start_build() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("Bands are chosen for 1 of the encoder's 3 input bands" in text for text in warnings)
    assert not (tmp_path / "index").exists()


def test_band_choice_resets_on_layer_switch(dock, shared_data, qgis_canvas):
    naip = QgsRasterLayer(str(shared_data / NAIP_RASTER), "naip")
    ships = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    show_layer(qgis_canvas, naip)
    QgsProject.instance().addMapLayer(ships)
    dock.raster_combo.setLayer(naip)
    for combo, band in zip(dock.band_combos, (4, 1, 2)):
        combo.setBand(band)

    dock.raster_combo.setLayer(ships)

    assert [combo.currentBand() for combo in dock.band_combos] == [-1, -1, -1]
    assert all(combo.currentText().endswith(": auto") for combo in dock.band_combos)
    assert dock.band_indexes() is None


def test_auto_bands_need_rgb_encoder(dock, shared_data, qgis_canvas):
    choose_raster(dock, qgis_canvas, shared_data / NAIP_RASTER, "naip")
    dock.encoder_spec = replace(dock.encoder_spec, bands=("nir", "red", "green"))

    with pytest.raises(LookalikeError, match="nir, red, green, which auto cannot pick"):
        dock.band_indexes()
    for combo, band in zip(dock.band_combos, (4, 1, 2)):
        combo.setBand(band)
    assert dock.band_indexes() == (4, 1, 2)


def test_failed_append_keeps_index_open(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    choose_raster(dock, qgis_canvas, shared_data / SHIPS_RASTER, "ships", tmp_path / "index")
    dock.start_build()
    wait_for_tasks(dock)
    dock.add_to_index_check.setChecked(True)

    dock.start_build()
    wait_for_tasks(dock)

    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("already in index" in text for text in critical)
    assert dock.index is not None
    assert dock.index.count > 0


def test_failed_build_elsewhere_keeps_index_status(dock, shared_data, tmp_path, qgis_canvas, monkeypatch):
    from lookalike.ui import jobs

    choose_raster(dock, qgis_canvas, shared_data / SHIPS_RASTER, "ships", tmp_path / "index")
    dock.start_build()
    wait_for_tasks(dock)
    open_count = dock.index.count

    def failing_build(params, progress=None, is_cancelled=None):
        raise LookalikeError(f"0 tiles embedded into {params.index_folder}")

    monkeypatch.setattr(jobs, "build_index", failing_build)
    dock.index_folder.setFilePath(str(tmp_path / "other"))
    dock.start_build()
    wait_for_tasks(dock)

    assert dock.index is not None
    assert dock.status_label.text().startswith(f"The build failed; see the message bar. Index open: {open_count}")


def test_status_names_the_index_searches_use(dock, shared_data, tmp_path, qgis_canvas):
    choose_raster(dock, qgis_canvas, shared_data / SHIPS_RASTER, "ships", tmp_path / "ships_index")
    dock.start_build()
    wait_for_tasks(dock)
    assert "in ships_index," in dock.status_label.text()
    assert "next build" not in dock.status_label.text()

    dock.index_folder.setFilePath(str(tmp_path / "new_index"))

    assert dock.status_label.text().endswith("Searches use it; the next build writes to new_index.")
    assert "in ships_index," in dock.status_label.text()

    # A long name is cut in the middle, because the line cannot wrap one word and would widen the panel.
    dock.index_folder.setFilePath(str(tmp_path / ("survey_" + "x" * 60 + "_2026")))
    assert dock.status_label.text().endswith("the next build writes to survey_xxxxxxxx…xxxxxxxxxxx_2026.")


def test_added_date_takes_index_gsd(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    # Another date of the same NAIP quarter quad is added to an index built at a coarser GSD than
    # the raster's own: choosing the new layer must not reset the GSD to the layer's 5 m.
    naip = shared_data / "geo" / "naip_timeseries"
    choose_raster(dock, qgis_canvas, naip / "m_4709963_se_14_1_20090818.tif", "naip 2009", tmp_path / "index")
    dock.gsd_spin.setValue(10.0)
    dock.start_build()
    wait_for_tasks(dock)
    assert dock.index is not None
    # NAIP bands carry no red, green and blue interpretation, so a warning names the bands read.
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert any("bands [1, 2, 3] are read as" in text for text in warnings), warnings
    later = QgsRasterLayer(str(naip / "m_4709963_se_14_1_20200831.tif"), "naip 2020")
    QgsProject.instance().addMapLayer(later)

    dock.add_to_index_check.setChecked(True)
    dock.raster_combo.setLayer(later)

    assert dock.gsd_spin.value() == pytest.approx(10.0)
    assert not dock.gsd_spin.isEnabled()
    dock.start_build()
    wait_for_tasks(dock)
    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert len(TileIndex.open(tmp_path / "index").sources) == 2
    dock.add_to_index_check.setChecked(False)
    assert dock.gsd_spin.isEnabled()


def test_added_date_takes_index_overlap(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    # Built in Processing with an overlap no whole percent gives: 33.7 % of 224 px leaves a stride
    # of 149 px, but the 33 % the field shows leaves 150 px, with which the addition would fail.
    # The bundled encoder's 224 px input, on which one percent is more than two pixels.
    dock.encoder_file.setFilePath(str(default_model_path()))
    wait_until(lambda: dock.encoder_spec is not None and dock.encoder_spec.input_size_px == 224)
    naip = shared_data / "geo" / "naip_timeseries"
    build_index(BuildParameters(
        source_paths=(str(naip / "m_4709963_se_14_1_20090818.tif"),), index_folder=str(tmp_path / "index"),
        tile_ground_size_m=2240.0, overlap_fraction=0.337,
    ))
    dock.overlap_spin.setValue(0)
    choose_raster(dock, qgis_canvas, naip / "m_4709963_se_14_1_20200831.tif", "naip 2020", tmp_path / "index")
    wait_for_tasks(dock)

    dock.add_to_index_check.setChecked(True)

    assert dock.overlap_spin.value() == 33
    assert not dock.overlap_spin.isEnabled()
    dock.start_build()
    wait_for_tasks(dock)
    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    added = TileIndex.open(tmp_path / "index")
    assert [source["grid"]["stride_px"] for source in added.sources] == [149, 149]
    dock.add_to_index_check.setChecked(False)
    assert dock.overlap_spin.isEnabled()


def test_unchecking_add_brings_own_grid_back(dock, shared_data, tmp_path, qgis_canvas):
    build_naip_2009(dock, qgis_canvas, shared_data, tmp_path / "index", gsd_m=12.0, overlap_percent=25)
    dock.gsd_spin.setValue(7.5)
    dock.overlap_spin.setValue(40)

    dock.add_to_index_check.setChecked(True)
    assert (dock.gsd_spin.value(), dock.overlap_spin.value()) == (pytest.approx(12.0), 25)
    dock.add_to_index_check.setChecked(False)

    assert (dock.gsd_spin.value(), dock.overlap_spin.value()) == (pytest.approx(7.5), 40)


def test_add_to_folder_without_index_says_uncheck(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    build_naip_2009(dock, qgis_canvas, shared_data, tmp_path / "index", gsd_m=12.0)
    dock.add_to_index_check.setChecked(True)
    assert not dock.gsd_spin.isEnabled()

    empty = tmp_path / "empty"
    empty.mkdir()
    dock.index_folder.setFilePath(str(empty))

    # Nothing to follow: the fields are the analyst's again.
    assert dock.gsd_spin.isEnabled()
    assert dock.overlap_spin.isEnabled()
    no_index, warnings = build_warnings(dock, qgis_iface, "contains no Lookalike index to add this raster to")
    assert no_index, warnings
    assert "uncheck" in no_index[0]
    assert list(empty.iterdir()) == []


def build_warnings(dock, qgis_iface, phrase: str) -> tuple[list, list]:
    """Click Build with a clear message bar; return the warnings containing ``phrase``, and all warnings."""
    qgis_iface.messageBar().clear_messages()
    dock.start_build()
    wait_for_tasks(dock)
    warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    return [text for text in warnings if phrase in text], warnings


def test_coarse_raster_added_gets_separate_index_advice(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    build_naip_2009(dock, qgis_canvas, shared_data, tmp_path / "index", gsd_m=12.0)
    dock.add_to_index_check.setChecked(True)
    # 300 m pixels: a tile at 12 m/px spans about one of them.
    choose_raster(dock, qgis_canvas, shared_data / "geo" / "rasterio" / "RGB.byte.tif", "rgb")

    too_coarse, warnings = build_warnings(dock, qgis_iface, "cannot be added to the index, whose GSD is 12 m/px")

    assert too_coarse, warnings
    assert "Uncheck" in too_coarse[0]
    assert len(TileIndex.open(tmp_path / "index").sources) == 1


def test_project_opened_with_add_checked_takes_rebuilt_grid(dock, shared_data, tmp_path, qgis_canvas):
    # The index was built again elsewhere since the project was saved; a build started before
    # the index opens must already use the new grid.
    build_naip_2009(dock, qgis_canvas, shared_data, tmp_path / "index", gsd_m=20.0, overlap_percent=60)
    project_path = tmp_path / "survey.qgz"
    assert QgsProject.instance().write(str(project_path))
    build_index(BuildParameters(
        source_paths=(str(shared_data / NAIP_2009_RASTER),), index_folder=str(tmp_path / "index"),
        encoder_path=dock.encoder_path(), tile_ground_size_m=8.0 * dock.encoder_spec.input_size_px,
        overlap_fraction=0.1, overwrite_existing_index=True,
    ))
    dock.add_to_index_check.setChecked(True)

    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_path))

    assert dock.gsd_spin.value() == pytest.approx(8.0)
    assert dock.overlap_spin.value() == round(100 * (1 - 29 / 32))
    wait_for_tasks(dock)


def test_bad_encoder_file_reaches_message_bar(dock, tmp_path, qgis_iface):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    dock.encoder_file.setFilePath(str(broken))
    wait_for_tasks(dock)

    assert dock.encoder_spec is None
    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("broken.onnx" in text for text in critical)
    assert "cannot be used" in dock.encoder_info.text()


def test_query_outside_index_reports_error(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    layer = QgsRasterLayer(str(shared_data / SHIPS_RASTER), "ships")
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.start_build()
    wait_for_tasks(dock)
    assert dock.index is not None

    from qgis.core import QgsGeometry, QgsPointXY

    far_away = layer.extent().xMaximum() + 50000.0
    dock.add_query_geometry(QgsGeometry.fromPointXY(QgsPointXY(far_away, layer.extent().center().y())), False)
    wait_for_tasks(dock)
    critical = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert any("outside every indexed raster" in text for text in critical)


def choose_raster(dock, canvas, path: Path, name: str, index_folder: Optional[Path] = None) -> QgsRasterLayer:
    """Show the raster on the canvas, choose it in the dock and set the index folder."""
    layer = QgsRasterLayer(str(path), name)
    show_layer(canvas, layer)
    dock.raster_combo.setLayer(layer)
    if index_folder is not None:
        dock.index_folder.setFilePath(str(index_folder))
    return layer


def build_naip_2009(dock, canvas, shared_data: Path, index_folder: Path, gsd_m: float,
                    overlap_percent: Optional[int] = None) -> None:
    """Build an index of the 2009 NAIP date in the dock at ``gsd_m`` (and ``overlap_percent``)."""
    choose_raster(dock, canvas, shared_data / NAIP_2009_RASTER, "naip 2009", index_folder)
    dock.gsd_spin.setValue(gsd_m)
    if overlap_percent is not None:
        dock.overlap_spin.setValue(overlap_percent)
    dock.start_build()
    wait_for_tasks(dock)


def test_geographic_raster_gets_metric_defaults(dock, shared_data, tmp_path, qgis_canvas, qgis_iface):
    raster = sorted((shared_data / "geo" / "landsat_timeseries").glob("*.tif"))[0]
    layer = QgsRasterLayer(str(raster), "landsat")
    assert layer.crs().isGeographic()
    show_layer(qgis_canvas, layer)
    dock.raster_combo.setLayer(layer)

    # About 90 m pixels: the default GSD is the pixel size in metres, not in degrees.
    assert 50.0 < dock.gsd_spin.value() < 150.0
    dock.index_folder.setFilePath(str(tmp_path / "index"))
    dock.start_build()
    wait_for_tasks(dock)
    assert dock.index is not None
    assert "UTM" in dock.index.sources[0]["grid"]["crs_wkt"]

    dock.k_spin.setValue(4)
    dock.activate_tool("point")
    centre = qgis_canvas.getCoordinateTransform().transform(layer.extent().center())
    QTest.mouseClick(qgis_canvas.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                     QPoint(round(centre.x()), round(centre.y())))
    wait_for_tasks(dock)
    assert not qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical)
    assert dock.result_layer().featureCount() == 4
    assert dock.result_layer().crs().isGeographic()
