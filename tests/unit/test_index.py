"""Tests of the on-disk tile index: layout, validation, atomic saves and HNSW recall."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from osgeo import osr

from lookalike.core import index as index_module
from lookalike.core.errors import GridError, SearchError, SearchIndexError
from lookalike.core.grid import TileGrid
from lookalike.core.index import TILE_TABLE_DTYPE, TileIndex, exact_knn, index_damage, make_tile_table

EMBEDDING_DIM = 16


def utm_wkt() -> str:
    reference = osr.SpatialReference()
    reference.ImportFromEPSG(32633)
    return reference.ExportToWkt()


def encoder_info(name: str = "test-encoder", checksum: str = "a" * 64, dim: int = EMBEDDING_DIM) -> dict:
    return {"name": name, "checksum": checksum, "embedding_dim": dim, "spec": {"input_size_px": 32}}


def small_grid(n_rows: int = 10, n_cols: int = 10) -> TileGrid:
    # 100 m tiles every 50 m: neighbouring tiles overlap by half, as in a real build.
    return TileGrid(
        crs_wkt=utm_wkt(),
        origin_x=500000.0,
        origin_y=4000000.0,
        gsd=1.0,
        tile_size_px=100,
        stride_px=50,
        n_rows=n_rows,
        n_cols=n_cols,
    )


def source_record(grid: TileGrid, path: str = "/data/scene.tif") -> dict:
    return {
        "path": path,
        "crs_wkt": grid.crs_wkt,
        "checksum": "b" * 64,
        "grid": grid.to_dict(),
        "band_indexes": [1, 2, 3],
        "value_stretch": {"kind": "byte_range", "value_scale": 255.0, "band_indexes": [1, 2, 3]},
    }


def unit_vectors(n: int, dim: int = EMBEDDING_DIM, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def first_tiles(source_id: int, n: int, n_cols: int = 10) -> np.ndarray:
    return make_tile_table(source_id, np.arange(n) // n_cols, np.arange(n) % n_cols)


def filled_index(folder: Path, n: int = 30, **create_options) -> TileIndex:
    index = TileIndex.create(folder, encoder_info(), **create_options)
    source_id = index.add_source(source_record(small_grid()))
    index.add(unit_vectors(n), first_tiles(source_id, n))
    index.save()
    return index


@pytest.fixture
def force_hnsw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make knn() use the graph even for tiny indexes and large k."""
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MAX_TILES", 0)
    monkeypatch.setattr(index_module, "EXACT_SEARCH_MIN_FRACTION", 2.0)


def data_file_names(folder: Path) -> set:
    return {path.name for path in folder.iterdir() if path.name != "manifest.json"}


# -- create and open -------------------------------------------------------------------------------


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    built = filled_index(folder, n=30, build_parameters={"overlap_fraction": 0.5})
    built_ids, built_similarities = built.knn(unit_vectors(3, seed=9), k=5)

    opened = TileIndex.open(folder)

    assert opened.count == 30
    assert isinstance(opened.embeddings, np.memmap)
    assert opened.embeddings.dtype == np.float16
    np.testing.assert_allclose(opened.embeddings, unit_vectors(30), atol=1e-3)
    np.testing.assert_array_equal(opened.tile_table, first_tiles(0, 30))
    assert opened.encoder_info == encoder_info()
    assert opened.metric == "cosine"
    assert opened.build_parameters == {"overlap_fraction": 0.5}
    assert opened.hnsw_parameters["m"] == index_module.DEFAULT_M
    assert opened.hnsw_parameters["space"] == "ip"
    source = opened.sources[0]
    assert source["id"] == 0
    assert source["tile_count"] == 30
    assert source["path"] == "/data/scene.tif"
    assert source["band_indexes"] == [1, 2, 3]
    assert TileGrid.from_dict(source["grid"]) == small_grid()
    opened_ids, opened_similarities = opened.knn(unit_vectors(3, seed=9), k=5)
    np.testing.assert_array_equal(opened_ids, built_ids)
    np.testing.assert_allclose(opened_similarities, built_similarities, atol=1e-6)


def test_manifest_layout(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=4)

    manifest = json.loads((folder / "manifest.json").read_text())

    assert manifest["format"] == "lookalike-index"
    assert manifest["format_version"] == index_module.FORMAT_VERSION
    assert manifest["tile_count"] == 4
    assert manifest["encoder"]["checksum"] == "a" * 64
    assert set(manifest["files"]) == {"graph", "embeddings", "tiles"}
    for entry in manifest["files"].values():
        assert (folder / entry["name"]).stat().st_size == entry["size_bytes"]
    assert data_file_names(folder) == {entry["name"] for entry in manifest["files"].values()}
    assert manifest["created_at"] <= manifest["updated_at"]


def test_create_rejects_foreign_folder(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"jpeg")

    with pytest.raises(SearchIndexError, match="not empty and contains no index"):
        TileIndex.create(folder, encoder_info())
    with pytest.raises(SearchIndexError, match="not empty and contains no index"):
        TileIndex.create(folder, encoder_info(), overwrite=True)
    assert data_file_names(folder) == {"holiday.jpg"}


def test_create_existing_index_needs_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=5)
    (folder / "notes.txt").write_text("analyst notes")

    with pytest.raises(SearchIndexError, match="overwrite=True"):
        TileIndex.create(folder, encoder_info())
    assert TileIndex.open(folder).count == 5

    replaced = TileIndex.create(folder, encoder_info(dim=8), overwrite=True)

    assert replaced.count == 0
    reopened = TileIndex.open(folder)
    assert reopened.count == 0
    assert reopened.embedding_dim == 8
    assert "notes.txt" in data_file_names(folder)
    assert len(data_file_names(folder)) == 4


def test_create_rejects_bad_encoder_info(tmp_path: Path) -> None:
    info = encoder_info()
    del info["checksum"]
    with pytest.raises(SearchIndexError, match="checksum"):
        TileIndex.create(tmp_path / "a", info)
    with pytest.raises(SearchIndexError, match="embedding_dim 0"):
        TileIndex.create(tmp_path / "b", encoder_info(dim=0))
    with pytest.raises(SearchIndexError, match="metric 'l2'"):
        TileIndex.create(tmp_path / "c", encoder_info(), metric="l2")


def test_open_missing_folder_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-index"
    with pytest.raises(SearchIndexError, match=str(missing)):
        TileIndex.open(missing)


def test_open_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="manifest.json not found"):
        TileIndex.open(tmp_path)


def test_open_rejects_other_format_version(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SearchIndexError, match="format version 99.*update the Lookalike plugin"):
        TileIndex.open(folder)

    manifest["format_version"] = 0
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SearchIndexError, match="format version 0.*rebuild the index"):
        TileIndex.open(folder)


def test_open_rejects_unparsable_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    (folder / "manifest.json").write_text("{ not json")

    with pytest.raises(SearchIndexError, match="cannot be read as JSON"):
        TileIndex.open(folder)


@pytest.mark.parametrize("kind", ["graph", "embeddings", "tiles"])
def test_open_names_missing_file(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    name = json.loads((folder / "manifest.json").read_text())["files"][kind]["name"]
    (folder / name).unlink()

    with pytest.raises(SearchIndexError, match=f"{name} is missing"):
        TileIndex.open(folder)


@pytest.mark.parametrize("kind", ["graph", "embeddings", "tiles"])
def test_open_detects_truncated_file(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"][kind]["name"]
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 8)

    with pytest.raises(SearchIndexError, match="truncated or replaced"):
        TileIndex.open(folder)


def test_index_damage_takes_a_string_path(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    assert index_damage(str(folder)) is None
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["tiles"]["name"]
    path.unlink()

    assert f"{path.name} is missing" in index_damage(str(folder))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("row", 99999, r"gives tile 1 row 99999, col \d+ of source 0, whose grid has \d+ rows"),
    ("col", -1, r"gives tile 1 row \d+, col -1 of source 0"),
    ("source_id", 7, "gives tile 1 source 7, which the manifest lacks"),
])
def test_open_detects_tiles_off_their_grid(tmp_path: Path, field: str, value: int, message: str) -> None:
    # Same size and header: only the values tell that the table was edited.
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["tiles"]["name"]
    tiles = np.load(path)
    tiles[field][1] = value
    np.save(path, tiles)

    with pytest.raises(SearchIndexError, match=message + ".*the index is damaged, rebuild it"):
        TileIndex.open(folder)


def damage_graph(folder: Path, damage) -> None:
    """Apply ``damage(records, header)`` to the level-0 records of the index's graph file, in place."""
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["graph"]["name"]
    content = bytearray(path.read_bytes())
    header = index_module._GRAPH_HEADER.unpack_from(content, 0)
    count, record_bytes = header[2], header[3]
    records = np.frombuffer(content, dtype="<u4", count=count * record_bytes // 4,
                            offset=index_module._GRAPH_HEADER.size).reshape(count, -1)
    damage(records, header)
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(("part", "message"), [
    ("link", "links level-0 tiles to tile numbers beyond its 30 tiles"),
    ("link count", "links level-0 tiles to tile numbers beyond"),
    ("label", "labels its tiles with other numbers than 0 to 29"),
])
def test_open_detects_graph_damaged_in_place(tmp_path: Path, part: str, message: str) -> None:
    # The file keeps its length; a search over such links read outside the graph and crashed.
    folder = tmp_path / "index"
    filled_index(folder, n=30)

    def damage(records, header):
        label_offset = header[4]
        if part == "link":
            records[:, 1] = 0x7FFFFFFF
        elif part == "link count":
            records[:, 0] = 0xFFFF
        else:
            records[3, label_offset // 4] = records[4, label_offset // 4]

    damage_graph(folder, damage)

    with pytest.raises(SearchIndexError, match=message + ".*the index is damaged, rebuild it"):
        TileIndex.open(folder)


@pytest.mark.parametrize("edit", ["scaled", "reversed", "zero row"])
def test_open_detects_embeddings_edited_in_place(tmp_path: Path, edit: str) -> None:
    # Exact search reads this file, so an edit that keeps its length changed the results silently.
    folder = tmp_path / "index"
    filled_index(folder, n=30)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["embeddings"]["name"]
    embeddings = np.load(path, mmap_mode="r+")
    if edit == "scaled":
        embeddings[:] = embeddings * 10
    elif edit == "reversed":
        embeddings[:] = embeddings[::-1].copy()
    else:
        embeddings[7] = 0
    embeddings.flush()
    del embeddings

    with pytest.raises(SearchIndexError, match="holds another vector for tile .* than the embeddings file"):
        TileIndex.open(folder)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("metric", "l2", "metric 'l2', not one of cosine"),
    ("crs_wkt", "garbage", "source 0 with an invalid grid .*garbage"),
    ("value_stretch", "junk", "source 0 with a value_stretch of type str, not dict"),
    ("value_stretch", {"kind": "bogus", "value_scale": 255.0, "band_indexes": [1, 2, 3]},
     "source 0 with a value_stretch of kind 'bogus'"),
    ("value_stretch", {"kind": "byte_range", "value_scale": -1, "band_indexes": [1, 2, 3]},
     "source 0 with a value_stretch with value_scale -1, not a positive number"),
    ("value_stretch", {"kind": "byte_range", "value_scale": "abc", "band_indexes": [1, 2, 3]},
     "source 0 with a value_stretch with value_scale 'abc', not a positive number"),
    ("value_stretch", {"kind": "percentile", "value_scale": 255.0, "band_indexes": [1, 2, 3], "low": [0, 0],
                       "high": [9, 9, 9], "scale": [1, 1, 1], "offset": [0, 0, 0]},
     "source 0 with a value_stretch whose low is not one number per band"),
    ("value_stretch", {"kind": "byte_range", "value_scale": 255.0, "band_indexes": [1, 2, 9]},
     r"source 0 with band_indexes \[1, 2, 3\] but a value_stretch for bands \[1, 2, 9\]"),
    ("band_indexes", [0, 1, 2], r"source 0 with band_indexes \[0, 1, 2\], not a list of band numbers"),
    ("band_indexes", "1,2,3", "source 0 with band_indexes '1,2,3', not a list of band numbers"),
])
def test_open_rejects_manifest_values(tmp_path: Path, key: str, value: str, message: str) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if key == "metric":
        manifest["metric"] = value
    elif key == "crs_wkt":
        manifest["sources"][0]["grid"]["crs_wkt"] = value
    else:
        manifest["sources"][0][key] = value
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(SearchIndexError, match=f"manifest.json has {message}.*the index is damaged"):
        TileIndex.open(folder)


def test_open_unfinished_first_save(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "graph.000001.hnsw.tmp").write_bytes(b"left by a killed first save")
    # The build removes its checkpoints only after the save, so a killed first save leaves them.
    (tmp_path / "index.partial").mkdir()

    with pytest.raises(SearchIndexError, match="first save stopped before it finished; run the build again"):
        TileIndex.open(folder)


def test_open_data_files_without_manifest_or_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=5)
    (folder / "manifest.json").unlink()

    with pytest.raises(SearchIndexError) as raised:
        TileIndex.open(folder)

    assert "no checkpoints are left to finish it from" in str(raised.value)
    assert "continues from its checkpoints" not in str(raised.value)


def graph_file(folder: Path) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["files"]["graph"]["name"]


def graph_levels(content: bytes) -> tuple[tuple, list, list]:
    """Return a graph file's header, each tile's level and where its upper-level links start."""
    header = index_module._GRAPH_HEADER.unpack_from(content, 0)
    count, record_bytes, max_m = header[2], header[3], header[8]
    position = index_module._GRAPH_HEADER.size + count * record_bytes
    levels, starts = [], []
    for _ in range(count):
        (size_bytes,) = index_module._LINK_LIST_SIZE.unpack_from(content, position)
        position += index_module._LINK_LIST_SIZE.size
        levels.append(size_bytes // (4 * (1 + max_m)))
        starts.append(position)
        position += size_bytes
    return header, levels, starts


@pytest.mark.parametrize("damage", ["entry point on level 0", "upper link to a level-0 tile", "top level raised",
                                    "one vector scaled"])
def test_open_detects_graph_structure_damaged_in_place(tmp_path: Path, damage: str) -> None:
    # Each of these once passed open() and crashed a later graph search, or gave wrong results.
    folder = tmp_path / "index"
    filled_index(folder, n=100, m=4)
    path = graph_file(folder)
    content = bytearray(path.read_bytes())
    header, levels, starts = graph_levels(content)
    level_zero_tile = levels.index(0)
    header_fields = list(header)
    if damage == "entry point on level 0":
        header_fields[7] = level_zero_tile
        index_module._GRAPH_HEADER.pack_into(content, 0, *header_fields)
        message = f"starts its search at tile {level_zero_tile} of level 0"
    elif damage == "upper link to a level-0 tile":
        upper_tile = next(tile for tile, level in enumerate(levels) if level >= 1)
        upper_links = np.frombuffer(content, dtype="<u4", count=2, offset=starts[upper_tile])
        assert upper_links[0] & 0xFFFF >= 1
        np.frombuffer(content, dtype="<u4", count=2, offset=starts[upper_tile])[1] = level_zero_tile
        message = f"links tile {upper_tile} on level 1 to a tile that has no such level"
    elif damage == "top level raised":
        header_fields[6] += 2
        index_module._GRAPH_HEADER.pack_into(content, 0, *header_fields)
        message = "but its top level is"
    else:
        record_bytes, offset_data, dim = header[3], header[5], EMBEDDING_DIM
        start = index_module._GRAPH_HEADER.size + 77 * record_bytes + offset_data
        np.frombuffer(content, dtype="<f4", count=dim, offset=start)[:] *= 3
        message = "holds another vector for tile"
    path.write_bytes(bytes(content))

    with pytest.raises(SearchIndexError, match=message + ".*the index is damaged, rebuild it"):
        TileIndex.open(folder)


@pytest.mark.parametrize("field, value", [(0, 2**32), (0, 8), (5, 12), (4, 20)])
def test_open_detects_graph_header_offsets(tmp_path: Path, field: int, value: int) -> None:
    # hnswlib loads the offsets unchecked; a damaged level-0 offset (field 0) crashed the process.
    folder = tmp_path / "index"
    filled_index(folder, n=20, m=4)
    path = graph_file(folder)
    content = bytearray(path.read_bytes())
    header_fields = list(index_module._GRAPH_HEADER.unpack_from(content, 0))
    header_fields[field] = value
    index_module._GRAPH_HEADER.pack_into(content, 0, *header_fields)
    path.write_bytes(bytes(content))

    with pytest.raises(SearchIndexError, match="has a header whose offsets .* the index is damaged, rebuild it"):
        TileIndex.open(folder)


def test_open_detects_a_tile_listed_twice(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["tiles"]["name"]
    tiles = np.load(path)
    tiles[2] = tiles[0]
    np.save(path, tiles)

    expected = f"lists row {tiles['row'][0]}, col {tiles['col'][0]} of source 0 twice \\(tiles 0 and 2\\)"
    with pytest.raises(SearchIndexError, match=expected + ".*the index is damaged, rebuild it"):
        TileIndex.open(folder)


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("rows", [slice(None), slice(5, 6)])
def test_nan_embeddings_named_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: slice,
                                      graph: bool) -> None:
    folder = tmp_path / "index"
    # Opened before the damage: its embeddings are a memory map of the file edited below.
    index = filled_index(folder, n=16)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["embeddings"]["name"]
    embeddings = np.load(path)
    embeddings[rows] = np.nan
    with open(path, "r+b") as stream:
        np.save(stream, embeddings)
    # Same size and header: open() finds the damage by comparing the embeddings with the graph.
    with pytest.raises(SearchIndexError, match="holds another vector for tile .* than the embeddings file"):
        TileIndex.open(folder)
    # The index opened before must not return NaN scores either.
    if graph:
        monkeypatch.setattr(index_module, "EXACT_SEARCH_MAX_TILES", 0)
        monkeypatch.setattr(index_module, "EXACT_SEARCH_MIN_FRACTION", 2.0)

    with pytest.raises(SearchIndexError, match="damaged.*build it again"):
        index.knn(unit_vectors(1, seed=3), k=16)


def test_open_detects_count_mismatch(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tile_count"] = 4
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(SearchIndexError, match="3 tiles in all but tile_count 4"):
        TileIndex.open(folder)


def test_open_detects_corrupt_graph(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    manifest = json.loads((folder / "manifest.json").read_text())
    path = folder / manifest["files"]["graph"]["name"]
    # Same size, so only hnswlib's own checks can notice.
    path.write_bytes(b"\xff" * manifest["files"]["graph"]["size_bytes"])

    with pytest.raises(SearchIndexError, match="HNSW graph .* the index is damaged, rebuild it"):
        TileIndex.open(folder)


# -- encoder and sources -----------------------------------------------------------------------------


def test_check_encoder_accepts_same_checksum(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    index.check_encoder("renamed-but-same-file", "a" * 64)


def test_check_encoder_for_adding_names_build(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info(name="resnet-rgb"))

    with pytest.raises(SearchIndexError) as raised:
        index.check_encoder("vit-naip", "f" * 64, purpose="add")

    message = str(raised.value)
    assert "but this build uses encoder 'vit-naip'" in message
    assert "add the rasters with 'resnet-rgb', or build a new index with 'vit-naip'" in message
    assert "query" not in message


def test_check_encoder_mismatch_names_both(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info(name="resnet-rgb"))

    with pytest.raises(SearchIndexError) as raised:
        index.check_encoder("vit-naip", "f" * 64)

    message = str(raised.value)
    assert "'resnet-rgb'" in message
    assert "'vit-naip'" in message
    assert "aaaaaaaaaaaa" in message
    assert "ffffffffffff" in message


def test_check_encoder_same_name_other_weights(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info(name="resnet-rgb"))

    with pytest.raises(SearchIndexError) as raised:
        index.check_encoder("resnet-rgb", "f" * 64)

    message = str(raised.value)
    assert "the encoder file of that name now has other weights (sha256 ffffffffffff)" in message
    assert "query with 'resnet-rgb'" not in message


def test_add_source_rejects_bad_records(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    with pytest.raises(SearchIndexError, match="grid"):
        index.add_source({"path": "/data/x.tif"})
    broken_grid = small_grid().to_dict()
    del broken_grid["gsd"]
    with pytest.raises(GridError, match="gsd"):
        index.add_source({"path": "/data/x.tif", "grid": broken_grid})
    with pytest.raises(SearchIndexError, match="JSON"):
        index.add_source({"path": Path("/data/x.tif"), "grid": small_grid().to_dict()})
    assert index.sources == []


def test_update_source_is_saved(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=3)

    index.update_source(0, {"skipped_counts": {"nodata": 7, "masked": 2}})
    with pytest.raises(SearchIndexError, match="tile_count"):
        index.update_source(0, {"tile_count": 1})
    with pytest.raises(SearchIndexError, match="source id 5 not found"):
        index.update_source(5, {"skipped_counts": {}})
    index.save()

    assert TileIndex.open(folder).sources[0]["skipped_counts"] == {"nodata": 7, "masked": 2}


def test_tile_bounds_from_source_grid(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    grid = small_grid()
    other_grid = TileGrid(
        crs_wkt='LOCAL_CS["local"]',
        origin_x=0.0,
        origin_y=0.0,
        gsd=2.0,
        tile_size_px=10,
        stride_px=10,
        n_rows=2,
        n_cols=2,
    )
    first = index.add_source(source_record(grid))
    second = index.add_source(source_record(other_grid, path="/data/other.tif"))
    index.add(unit_vectors(2), np.array([[first, 3, 4], [second, 1, 1]], dtype=np.int64))

    assert index.tile_bounds(0) == grid.tile_bounds(3, 4)
    assert index.tile_bounds(0) == (500200.0, 3999750.0, 500300.0, 3999850.0)
    assert index.tile_crs_wkt(0) == grid.crs_wkt
    assert index.tile_bounds(1) == (20.0, -40.0, 40.0, -20.0)
    assert index.tile_crs_wkt(1) == 'LOCAL_CS["local"]'
    with pytest.raises(SearchIndexError, match="tile id 2 not found"):
        index.tile_bounds(2)


# -- adding ------------------------------------------------------------------------------------------


def test_add_rejects_invalid_input(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    source_id = index.add_source(source_record(small_grid()))
    vectors = unit_vectors(3)

    with pytest.raises(SearchIndexError, match="16-dim"):
        index.add(unit_vectors(3, dim=8), first_tiles(source_id, 3))
    with pytest.raises(SearchIndexError, match="3 embeddings but 2 tile table rows"):
        index.add(vectors, first_tiles(source_id, 2))
    zero = vectors.copy()
    zero[1] = 0.0
    with pytest.raises(SearchIndexError, match="all zeros \\(first at row 1\\).*blank or nodata"):
        index.add(zero, first_tiles(source_id, 3))
    nan = vectors.copy()
    nan[2, 5] = np.nan
    with pytest.raises(SearchIndexError, match="NaN.*row 2"):
        index.add(nan, first_tiles(source_id, 3))
    with pytest.raises(SearchIndexError, match="outside the 10 x 10 grid"):
        index.add(vectors, make_tile_table(source_id, [0, 0, 10], [0, 1, 2]))
    with pytest.raises(SearchIndexError, match="source id 1 not found"):
        index.add(vectors, first_tiles(1, 3))
    with pytest.raises(SearchIndexError, match="tile table"):
        index.add(vectors, np.zeros((3, 2), dtype=np.int64))

    assert index.count == 0
    assert index.sources[0]["tile_count"] == 0


def test_add_normalises_embeddings(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    source_id = index.add_source(source_record(small_grid()))

    index.add(3.0 * unit_vectors(2), first_tiles(source_id, 2))

    np.testing.assert_allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1.0, atol=1e-3)
    _, similarities = index.knn(unit_vectors(2)[:1], k=1)
    assert similarities[0, 0] == pytest.approx(1.0, abs=1e-3)


def test_add_accepts_column_array(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())
    source_id = index.add_source(source_record(small_grid()))

    tile_ids = index.add(unit_vectors(2), np.array([[source_id, 2, 3], [source_id, 4, 5]]))

    np.testing.assert_array_equal(tile_ids, [0, 1])
    assert index.tile_table.dtype == TILE_TABLE_DTYPE
    assert index.tile_table[1].tolist() == (source_id, 4, 5)


def test_incremental_add_resizes_graph(tmp_path: Path, force_hnsw: None) -> None:
    folder = tmp_path / "index"
    index = TileIndex.create(folder, encoder_info(), initial_capacity_tiles=8)
    source_id = index.add_source(source_record(small_grid()))
    vectors = unit_vectors(50)

    tiles = first_tiles(source_id, 50)
    for batch_start in range(0, 50, 10):
        batch = slice(batch_start, batch_start + 10)
        tile_ids = index.add(vectors[batch], tiles[batch])
        np.testing.assert_array_equal(tile_ids, np.arange(batch_start, batch_start + 10))
        if batch_start == 20:
            index.save()

    assert index.count == 50
    assert index.sources[0]["tile_count"] == 50
    nearest, similarities = index.knn(vectors, k=1)
    np.testing.assert_array_equal(nearest[:, 0], np.arange(50))
    np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)

    index.save()
    reopened = TileIndex.open(folder)
    source_id = 0
    more = unit_vectors(20, seed=3)
    reopened.add(more, make_tile_table(source_id, np.full(20, 9), np.arange(20) % 10))
    nearest, _ = reopened.knn(np.concatenate([vectors, more]), k=1)
    np.testing.assert_array_equal(nearest[:, 0], np.arange(70))


# -- atomic saves ------------------------------------------------------------------------------------


def test_crash_before_manifest_keeps_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=10)
    files_before = data_file_names(folder)
    index.add(unit_vectors(5, seed=4), make_tile_table(0, np.full(5, 5), np.arange(5)))

    real_replace = os.replace

    def crash_on_manifest(source: str, target: str) -> None:
        if Path(target).name == "manifest.json":
            raise OSError("simulated power loss")
        real_replace(source, target)

    monkeypatch.setattr(index_module.os, "replace", crash_on_manifest)
    with pytest.raises(SearchIndexError, match="simulated power loss.*Free disk space"):
        index.save()
    monkeypatch.setattr(index_module.os, "replace", real_replace)

    survivor = TileIndex.open(folder)
    assert survivor.count == 10
    assert survivor.sources[0]["tile_count"] == 10
    np.testing.assert_allclose(survivor.embeddings, unit_vectors(10), atol=1e-3)
    # The failed save took its own files with it.
    assert data_file_names(folder) == files_before

    # A save killed at the same point cannot clean up; the next successful save publishes the
    # tiles and removes what the killed one left.
    for name in ("graph.000002.hnsw", "embeddings.000002.npy", "tiles.000002.npy.tmp", "manifest.json.tmp"):
        (folder / name).write_bytes(b"left by a killed save")
    index.save()
    assert TileIndex.open(folder).count == 15
    assert len(data_file_names(folder)) == 3


def test_crash_between_data_files_keeps_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=10)
    index.add(unit_vectors(5, seed=4), make_tile_table(0, np.full(5, 5), np.arange(5)))

    def crash_writing_tiles(path: Path, array: np.ndarray) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk full")

    files_before = data_file_names(folder)
    monkeypatch.setattr(index_module, "_write_npy", crash_writing_tiles)
    with pytest.raises(SearchIndexError, match="disk full"):
        index.save()

    assert TileIndex.open(folder).count == 10
    # Neither the temporary file nor the data files already renamed stay to fill the disk.
    assert data_file_names(folder) == files_before


def test_failed_save_removes_files_of_a_killed_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=10)
    index.add(unit_vectors(5, seed=4), make_tile_table(0, np.full(5, 5), np.arange(5)))
    # What an earlier save killed while writing leaves behind, taking space a full disk needs.
    (folder / "embeddings.000007.npy.tmp").write_bytes(b"left by a killed save")

    def disk_full(path: Path, array: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    files_before = data_file_names(folder) - {"embeddings.000007.npy.tmp"}
    monkeypatch.setattr(index_module, "_write_npy", disk_full)
    with pytest.raises(SearchIndexError, match="No space left"):
        index.save()

    assert data_file_names(folder) == files_before
    assert TileIndex.open(folder).count == 10


def test_embeddings_written_without_a_memory_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pages of a writable map that a full disk cannot store end the process with SIGBUS.
    open_memmap = np.lib.format.open_memmap

    def read_only_maps(filename, mode="r+", *args, **kwargs):
        if mode != "r":
            raise AssertionError(f"the embeddings were written through a memory map (mode {mode!r})")
        return open_memmap(filename, mode, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", read_only_maps)
    index = filled_index(tmp_path / "index", n=10)

    np.testing.assert_array_equal(TileIndex.open(tmp_path / "index").embeddings, index.embeddings)


def test_save_refuses_a_stale_copy(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=10)
    first, second = TileIndex.open(folder), TileIndex.open(folder)
    first.add(unit_vectors(2, seed=7), make_tile_table(0, [6, 6], [0, 1]))
    first.save()
    second.add(unit_vectors(3, seed=8), make_tile_table(0, [7, 7, 7], [0, 1, 2]))

    with pytest.raises(SearchIndexError, match="saved from another copy") as error:
        second.save()

    assert "open it again" in str(error.value)
    reopened = TileIndex.open(folder)
    assert reopened.count == 12
    np.testing.assert_allclose(reopened.embeddings[10:], unit_vectors(2, seed=7), atol=1e-3)


def test_save_refuses_copy_of_replaced_index(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=10)
    stale = TileIndex.open(folder)
    shutil.rmtree(folder)
    # A new index in the same folder, at the same generation as the stale copy.
    filled_index(folder, n=6)
    stale.add(unit_vectors(2, seed=9), make_tile_table(0, [8, 8], [0, 1]))

    with pytest.raises(SearchIndexError, match="saved from another copy"):
        stale.save()

    assert TileIndex.open(folder).count == 6


def test_save_removes_old_generations(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=4)
    for step in range(3):
        index.add(unit_vectors(2, seed=10 + step), make_tile_table(0, [6 + step, 6 + step], [0, 1]))
        index.save()

    manifest = json.loads((folder / "manifest.json").read_text())
    assert data_file_names(folder) == {entry["name"] for entry in manifest["files"].values()}
    assert TileIndex.open(folder).count == 10


# -- nearest neighbours ------------------------------------------------------------------------------


def test_knn_k_larger_than_count(tmp_path: Path, force_hnsw: None) -> None:
    index = filled_index(tmp_path / "index", n=6)

    tile_ids, similarities = index.knn(unit_vectors(2, seed=5), k=50)

    assert tile_ids.shape == (2, 6)
    assert similarities.shape == (2, 6)
    assert sorted(tile_ids[0].tolist()) == list(range(6))
    assert (np.diff(similarities, axis=1) <= 1e-6).all()


def test_knn_empty_index(tmp_path: Path) -> None:
    index = TileIndex.create(tmp_path / "index", encoder_info())

    tile_ids, similarities = index.knn(unit_vectors(3), k=10)

    assert tile_ids.shape == (3, 0)
    assert similarities.shape == (3, 0)


def test_knn_raises_ef_to_k(tmp_path: Path, force_hnsw: None) -> None:
    index = filled_index(tmp_path / "index", n=60)
    query = unit_vectors(1, seed=6)

    tile_ids, _ = index.knn(query, k=40, ef=1)

    expected_ids, _ = exact_knn(index.embeddings, query, 40)
    assert tile_ids.shape == (1, 40)
    assert len(set(tile_ids[0].tolist()) & set(expected_ids[0].tolist())) >= 38


def test_knn_rejects_invalid_queries(tmp_path: Path) -> None:
    index = filled_index(tmp_path / "index", n=3)
    with pytest.raises(SearchError, match="16-dim"):
        index.knn(unit_vectors(1, dim=8), k=1)
    with pytest.raises(SearchError, match="blank or nodata"):
        index.knn(np.zeros(EMBEDDING_DIM), k=1)
    with pytest.raises(SearchError, match="k 0 is invalid"):
        index.knn(unit_vectors(1), k=0)


@pytest.mark.parametrize("ef", [0, -5, 2.5, True])
def test_knn_rejects_invalid_ef(tmp_path: Path, ef) -> None:
    index = filled_index(tmp_path / "index", n=3)

    with pytest.raises(SearchError, match=f"ef {ef!r} is invalid"):
        index.knn(unit_vectors(1), k=1, ef=ef)


def test_exact_knn_orders_ties_by_id() -> None:
    vectors = unit_vectors(3)
    embeddings = np.stack([vectors[0], vectors[1], vectors[0], vectors[2], vectors[0]]).astype(np.float16)

    tile_ids, similarities = exact_knn(embeddings, vectors[:1], k=4)

    assert tile_ids[0, :3].tolist() == [0, 2, 4]
    assert similarities[0, 0] == similarities[0, 2]


def test_exact_knn_blocks_match_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "EXACT_SEARCH_BLOCK_ROWS", 7)
    embeddings = unit_vectors(100, seed=7)
    queries = unit_vectors(4, seed=8)

    tile_ids, similarities = exact_knn(embeddings, queries, k=12)

    expected = np.argsort(-(queries @ embeddings.T), axis=1, kind="stable")[:, :12]
    np.testing.assert_array_equal(tile_ids, expected)
    np.testing.assert_allclose(similarities, np.take_along_axis(queries @ embeddings.T, expected, 1), atol=1e-6)


def clustered_embeddings(n: int, n_queries: int, seed: int) -> tuple:
    """Return ``(tiles, queries)`` shaped like encoder embeddings: clusters in a subspace.

    The model assumed here: encoder embeddings use a low-dimensional part of their 1280
    dimensions and cluster by what the tiles show. Here 50 cluster centres live in a 512-dim
    subspace, points spread around them, and a little full-dimensional noise is added. Queries
    are fresh points from the same clusters.
    """
    rng = np.random.default_rng(seed)
    dim, subspace_dim, n_clusters = 1280, 512, 50
    projection = rng.standard_normal((subspace_dim, dim)).astype(np.float32) / np.sqrt(subspace_dim)
    centres = rng.standard_normal((n_clusters, subspace_dim)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        latent = centres[rng.integers(0, n_clusters, count)]
        latent = latent + rng.standard_normal((count, subspace_dim)).astype(np.float32)
        points = latent @ projection + 0.1 * rng.standard_normal((count, dim)).astype(np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    return draw(n), draw(n_queries)


def hnsw_recall_at_10(folder: Path, **create_options) -> float:
    tiles, queries = clustered_embeddings(n=4000, n_queries=200, seed=11)
    index = TileIndex.create(folder, encoder_info(dim=1280), **create_options)
    source_id = index.add_source(source_record(small_grid(n_rows=40, n_cols=100)))
    index.add(tiles, make_tile_table(source_id, np.arange(4000) // 100, np.arange(4000) % 100))
    assert index.count > index_module.EXACT_SEARCH_MAX_TILES, "the index must be large enough to use HNSW"

    found, _ = index.knn(queries, k=10)
    expected, _ = exact_knn(tiles, queries, k=10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), expected.tolist())]))


def test_hnsw_recall_at_10(tmp_path: Path) -> None:
    # Recall on real encoder embeddings is measured by the benchmarks. This test checks that the
    # default M, ef_construction and ef_search keep HNSW close to exact search.
    assert hnsw_recall_at_10(tmp_path / "index") >= 0.98


def test_recall_data_is_not_trivial(tmp_path: Path) -> None:
    # A starved graph must fail the threshold, or the recall test above could never fail.
    starved = hnsw_recall_at_10(tmp_path / "index", m=4, ef_construction=16, ef_search=10)
    assert starved < 0.9


MANIFEST_DAMAGE = {
    "files as a list": lambda manifest: manifest.update(files=[]),
    "encoder as text": lambda manifest: manifest.update(encoder="efficientnet"),
    "no HNSW space": lambda manifest: manifest["hnsw"].pop("space"),
    "HNSW as null": lambda manifest: manifest.update(hnsw=None),
    "unknown HNSW space": lambda manifest: manifest["hnsw"].update(space="banana"),
    "file outside the folder": lambda manifest: manifest["files"]["tiles"].update(name="../other/tiles.000001.npy"),
    "skip counts as null": lambda manifest: manifest["sources"][0].update(skipped_counts=None),
    "sources as null": lambda manifest: manifest.update(sources=None),
    "encoder checksum as null": lambda manifest: manifest["encoder"].update(checksum=None),
    "grid GSD as text": lambda manifest: manifest["sources"][0]["grid"].update(gsd="x"),
    "source tile count too high": lambda manifest: manifest["sources"][0].update(tile_count=11),
    "source id as null": lambda manifest: manifest["sources"][0].update(id=None),
    "skip count as text": lambda manifest: manifest["sources"][0].update(skipped_counts={"blank": "x"}),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_open_names_the_damaged_index(tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=10)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    MANIFEST_DAMAGE[damage](manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    with pytest.raises(SearchIndexError, match="damaged") as error:
        TileIndex.open(folder)
    assert str(folder) in str(error.value)


def test_short_graph_write_keeps_old_index(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    index = filled_index(folder, n=10)
    index.add(unit_vectors(5, seed=4), make_tile_table(0, np.full(5, 5), np.arange(5)))
    real_graph = index._graph

    class ShortWrites:
        """The graph, but its saved file loses its last 100 bytes, as on a full disk."""

        def __getattr__(self, name):
            return getattr(real_graph, name)

        def save_index(self, path: str) -> None:
            real_graph.save_index(path)
            with open(path, "r+b") as stream:
                stream.truncate(os.path.getsize(path) - 100)

    files_before = data_file_names(folder)
    index._graph = ShortWrites()
    with pytest.raises(SearchIndexError, match="not written completely"):
        index.save()

    assert TileIndex.open(folder).count == 10
    assert data_file_names(folder) == files_before


def save_during_open(monkeypatch: pytest.MonkeyPatch, writer: TileIndex, every_attempt: bool) -> list:
    """Make another writer add a tile and save right after an open reads the manifest; return one entry per save.

    The save deletes the files the open is about to read, as a save in another process does.
    """
    real_check = index_module._check_data_files
    saves: list = []

    def save_meanwhile(index_folder: Path, manifest: dict) -> dict:
        paths = real_check(index_folder, manifest)
        if every_attempt or not saves:
            count = writer.count
            writer.add(unit_vectors(1, seed=len(saves)), first_tiles(0, count + 1)[count:])
            writer.save()
            saves.append(True)
        return paths

    monkeypatch.setattr(index_module, "_check_data_files", save_meanwhile)
    return saves


def test_open_during_save_elsewhere_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    saves = save_during_open(monkeypatch, filled_index(folder, n=20), every_attempt=False)

    opened = TileIndex.open(folder)

    assert saves == [True]
    assert opened.count == 21


def test_open_during_every_save_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "index"
    saves = save_during_open(monkeypatch, filled_index(folder, n=20), every_attempt=True)

    with pytest.raises(SearchIndexError, match="was saved by another build or program") as raised:
        TileIndex.open(folder)

    assert "rebuild" not in str(raised.value)
    assert len(saves) == index_module.OPEN_ATTEMPTS


def test_open_unreadable_file_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, which chmod cannot lock out, so the read itself is made to fail.
    folder = tmp_path / "index"
    filled_index(folder, n=5)
    embeddings_path = folder / json.loads((folder / "manifest.json").read_text())["files"]["embeddings"]["name"]
    real_load = np.load

    def load(path, *args, **kwargs):
        if Path(path) == embeddings_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(index_module.np, "load", load)

    with pytest.raises(SearchIndexError) as raised:
        TileIndex.open(folder)

    message = str(raised.value)
    assert f"{embeddings_path} cannot be read (permission denied)" in message
    assert "give your user read access" in message
    assert "damaged" not in message


@pytest.mark.parametrize("kind", ["embeddings", "tiles"])
def test_open_names_damaged_array_header(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=5)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"][kind]["name"]
    content = bytearray(path.read_bytes())
    content[10:26] = bytes(byte ^ 0x5A for byte in content[10:26])
    path.write_bytes(bytes(content))

    with pytest.raises(SearchIndexError, match=f"{path} is not a readable NumPy array file .* rebuild it"):
        TileIndex.open(folder)


def test_open_detects_swapped_tile_rows(tmp_path: Path) -> None:
    # Swapping two rows keeps the file's size and every tile on its grid, but points ids at other places.
    folder = tmp_path / "index"
    filled_index(folder, n=6)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["tiles"]["name"]
    tiles = np.load(path)
    tiles[[1, 4]] = tiles[[4, 1]]
    with open(path, "r+b") as stream:
        np.save(stream, tiles)

    with pytest.raises(SearchIndexError, match=f"tile table {path} does not match the SHA-256 in the manifest"):
        TileIndex.open(folder)


def test_index_without_tile_digest_opens(tmp_path: Path) -> None:
    # Indexes saved before the digest was recorded open as before.
    folder = tmp_path / "index"
    filled_index(folder, n=6)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"]["tiles"]["sha256"]
    manifest_path.write_text(json.dumps(manifest))

    assert TileIndex.open(folder).count == 6


def test_open_names_folder_in_place_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    filled_index(folder, n=3)
    path = folder / json.loads((folder / "manifest.json").read_text())["files"]["embeddings"]["name"]
    path.unlink()
    path.mkdir()

    with pytest.raises(SearchIndexError, match=f"index file {path} is a folder, not a file"):
        TileIndex.open(folder)
