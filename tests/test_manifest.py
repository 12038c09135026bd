"""Manifests and grids: read, validated row by row, with stable keys. No services needed."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from models.request import GenerationRequest
from producer.runs.manifest import (
    CSV_TYPES,
    Manifest,
    ManifestError,
    fill_placeholders,
    format_rejects,
    load_grid,
    load_manifest,
    write_rejects,
)

ROOT = Path(__file__).resolve().parents[1]
FIRE = datetime(2026, 3, 7, 6, 5, tzinfo=timezone(timedelta(hours=1)))

ROWS: list[dict[str, Any]] = [
    {"prompt": "a red fox", "width": 512, "height": 512, "seed": 1},
    {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "guidance_scale": 5.5, "use_compel": True,
     "key": "lighthouse"},
    {"prompt": "a red fox", "width": 512, "height": 512, "seed": 1, "priority": "interactive"},
    {"prompt": "a teapot", "num_images": 2, "num_inference_steps": 30, "strength": 0.5, "guidance_scale": 7},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(name for row in rows for name in row))
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else str(row[c]).lower() if isinstance(row[c], bool) else row[c]
                             for c in columns])
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # every row with every column (null where not given): from_pylist takes its columns from the first row
    columns = list(dict.fromkeys(name for row in rows for name in row))
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
    return path


def summary(manifest: Manifest) -> list[tuple[str, dict[str, Any], str | None]]:
    return [(row.key, row.request.parameters(), row.priority) for row in manifest.rows]


# --- the three row formats -------------------------------------------------------------------


def test_jsonl_csv_and_parquet_give_the_same_rows(tmp_path: Path):
    jsonl = load_manifest(write_jsonl(tmp_path / "m.jsonl", ROWS))
    ndjson = load_manifest(write_jsonl(tmp_path / "m.ndjson", ROWS))
    csv_ = load_manifest(write_csv(tmp_path / "m.csv", ROWS))
    parquet = load_manifest(write_parquet(tmp_path / "m.parquet", ROWS))

    assert jsonl.rejects == csv_.rejects == parquet.rejects == []
    assert summary(jsonl) == summary(ndjson) == summary(csv_) == summary(parquet)
    assert [r.line for r in jsonl.rows] == [r.line for r in parquet.rows] == [1, 2, 3, 4]
    assert [r.line for r in csv_.rows] == [2, 3, 4, 5]  # the header is line 1
    keys = [r.key for r in jsonl.rows]
    assert keys[1] == "lighthouse"
    assert keys[0].endswith("-0") and keys[2] == keys[0][:-1] + "1"  # the same request twice
    assert [r.priority for r in jsonl.rows] == [None, None, "interactive", None]
    rows = list(jsonl.rows)
    assert rows[3].request.guidance_scale == 7.0 and rows[1].request.use_compel is True
    assert jsonl.source == str(tmp_path / "m.jsonl")
    import hashlib

    assert jsonl.sha256 == hashlib.sha256((tmp_path / "m.jsonl").read_bytes()).hexdigest()


def test_defaults_fill_missing_fields_and_a_rows_value_wins(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}, {"prompt": "b", "width": 1024, "num_inference_steps": 5}])
    manifest = load_manifest(path, {"num_inference_steps": 30, "width": 512})
    first, second = (row.request for row in manifest.rows)
    assert (first.num_inference_steps, first.width, first.height) == (30, 512, 768)  # 768: the schema's default
    assert (second.num_inference_steps, second.width) == (5, 1024)
    # a default changes the request, so it changes the derived key
    assert next(iter(load_manifest(path).rows)).key != next(iter(manifest.rows)).key


def test_csv_converts_text_to_the_fields_types(tmp_path: Path):
    path = tmp_path / "m.csv"
    path.write_text(
        "prompt,negative_prompt,num_images,width,guidance_scale,strength,use_compel,seed,key,priority\n"
        "a fox,,2,512,6.5,0.25,yes,7,,\n"
        '"a\nlighthouse",dark,,,,,NO,,k1,bulk\n'
        "a cat,,,,,,1,,,\n"
    )
    manifest = load_manifest(path, {"negative_prompt": "default neg", "seed": 3})
    assert manifest.rejects == []
    fox, lighthouse, cat = manifest.rows
    assert fox.request.parameters() == {
        "prompt": "a fox", "negative_prompt": "", "num_images": 2, "num_inference_steps": 25, "guidance_scale": 6.5,
        "strength": 0.25, "width": 512, "height": 768, "seed": 7, "use_compel": True, "model": None,
    }
    assert fox.line == 2 and fox.priority is None and fox.key.endswith("-0")
    # a quoted cell across two lines: the row's line is where it starts
    assert (lighthouse.line, lighthouse.key, lighthouse.priority) == (3, "k1", "bulk")
    assert lighthouse.request.prompt == "a\nlighthouse" and lighthouse.request.use_compel is False
    assert lighthouse.request.seed == 3  # an empty cell is "not given": the default applies
    assert (cat.line, cat.request.use_compel) == (5, True)


def test_csv_types_cover_every_typed_request_field():
    text_fields = {"prompt", "negative_prompt", "image", "mask", "depth_map", "model", "after"}  # after: refused in rows (`then`)
    assert set(CSV_TYPES) | text_fields == set(GenerationRequest.model_fields)


def test_a_csv_value_that_does_not_convert_is_a_problem_of_its_row(tmp_path: Path):
    path = tmp_path / "m.csv"
    path.write_text("prompt,width,guidance_scale,use_compel\na,abc,x,maybe\nb,512.0,,\nc,,,\nd,512,1,true,extra\n")
    manifest = load_manifest(path)
    assert [row.line for row in manifest.rows] == [4]
    assert [(r.line, r.problems) for r in manifest.rejects] == [
        (2, ["width='abc': not a whole number", "guidance_scale='x': not a number",
             "use_compel='maybe': not one of true, false, 1, 0, yes, no"]),
        (3, ["width='512.0': not a whole number"]),
        (5, ["has 5 cells, the header names 4 columns"]),
    ]
    assert manifest.rejects[0].row == {"prompt": "a", "width": "abc", "guidance_scale": "x", "use_compel": "maybe"}


def test_parquet_nulls_are_not_given_and_odd_columns_stay_json(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    table = pa.table({"prompt": ["a", "b"], "seed": [None, 5], "blob": [None, b"\x00\x01"]})
    pq.write_table(table, path)
    manifest = load_manifest(path, {"seed": 9})
    assert [(r.line, r.request.seed) for r in manifest.rows] == [(1, 9)]
    (reject,) = manifest.rejects
    assert reject.line == 2 and reject.problems == ["blob is not a request field"]
    assert reject.row == {"prompt": "b", "seed": 5, "blob": "<2 bytes>"}
    json.dumps(reject.row)


# --- bad rows ----------------------------------------------------------------------------------


def test_bad_rows_name_line_field_value_and_bound(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "ok"},
        "",
        {"prompt": "a", "width": 500, "num_images": 9},
        "not json",
        "[1, 2]",
        {"prompt": "b", "colour": "red", "priority": "urgent"},
        {"width": 512},
    ])
    manifest = load_manifest(path)
    assert [row.line for row in manifest.rows] == [1]
    assert [(r.line, r.problems) for r in manifest.rejects] == [
        (3, ["num_images=9: input should be less than or equal to 4",
             "width=500: must be a multiple of 64 from 256 to 1024 (one of 256, 320, 384, 448, 512, 576, 640, 704, "
             "768, 832, 896, 960, 1024)"]),
        (4, ["not a JSON object: Expecting value at column 1"]),
        (5, ["not a JSON object: a JSON array"]),
        (6, ["priority='urgent': must be one of interactive, bulk", "colour is not a request field"]),
        (7, ["prompt is required"]),
    ]
    assert manifest.rejects[1].row == {"text": "not json"}
    text = format_rejects(manifest.rejects)
    assert text.splitlines()[0] == "line 3: num_images=9: input should be less than or equal to 4"
    assert "line 7: prompt is required" in text and "more bad row" not in text


def test_format_rejects_shows_fifty_bad_rows_then_counts(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "width": 500}] * 120 + [{"prompt": "fine"}])
    manifest = load_manifest(path)
    # Only the first hundred are kept; the rest are counted, and read again to be written.
    assert len(manifest.rows) == 1 and manifest.reject_count == 120 and len(manifest.rejects) == 100
    assert [reject.line for reject in manifest.all_rejects()] == list(range(1, 121))
    lines = format_rejects(manifest.rejects, total=manifest.reject_count).splitlines()
    assert len(lines) == 51
    assert lines[0].startswith("line 1: width=500: must be a multiple of 64 from 256 to 1024")
    assert lines[49].startswith("line 50: width=500")
    assert lines[-1] == "... and 70 more bad rows"
    assert format_rejects(manifest.rejects[:51]).splitlines()[-1] == "... and 1 more bad row"


def test_rejects_are_written_as_jsonl(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "width": 500}, {"prompt": "b"}, "{oops"])
    manifest = load_manifest(path)
    out = tmp_path / "rejects.jsonl"
    write_rejects(manifest.rejects, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3]
    assert records[0]["row"] == {"prompt": "a", "width": 500}
    assert records[0]["problems"][0].startswith("width=500: must be a multiple of 64")
    assert records[1]["row"] == {"text": "{oops"}


# --- keys --------------------------------------------------------------------------------------


def test_an_explicit_key_that_repeats_is_refused(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "a", "key": "x"}, {"prompt": "b", "key": 7}, {"prompt": "c", "key": "x"}, {"prompt": "d", "key": "7"},
        {"prompt": "e", "key": ""}, {"prompt": "f", "key": True}, {"prompt": "g", "key": "k" * 256},
    ])
    manifest = load_manifest(path)
    assert [(r.line, r.key) for r in manifest.rows] == [(1, "x"), (2, "7")]
    assert [(r.line, r.problems) for r in manifest.rejects] == [
        (3, ["key 'x' repeats line 1"]),
        (4, ["key '7' repeats line 2"]),
        (5, ["key='': must be text or a whole number, of 1 to 255 characters"]),
        (6, ["key=True: must be text or a whole number, of 1 to 255 characters"]),
        (7, [f"key='{'k' * 56}...: must be text or a whole number, of 1 to 255 characters"]),
    ]


def test_derived_keys_are_stable_and_survive_appended_rows(tmp_path: Path):
    rows = [{"prompt": "a", "seed": 1}, {"prompt": "b"}, {"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 1}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    first = [r.key for r in load_manifest(path).rows]
    assert first == [r.key for r in load_manifest(path).rows]
    digest = first[0][:-2]
    assert len(digest) == 24 and first == [f"{digest}-0", first[1], f"{digest}-1", f"{digest}-2"]
    write_jsonl(path, [*rows, {"prompt": "c"}, {"prompt": "a", "seed": 1}])
    again = [r.key for r in load_manifest(path).rows]
    assert again[:4] == first and again[5] == f"{digest}-3"
    # a row given its own key does not count among the derived
    write_jsonl(path, [{"prompt": "a", "seed": 1, "key": "mine"}, *rows])
    assert [r.key for r in load_manifest(path).rows] == ["mine", *first]


def test_an_explicit_key_equal_to_a_derived_one_is_refused(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}])
    derived = next(iter(load_manifest(path).rows)).key
    write_jsonl(path, [{"prompt": "a"}, {"prompt": "b", "key": derived}])
    assert load_manifest(path).rejects[0].problems == [f"key {derived!r} repeats line 1"]
    write_jsonl(path, [{"prompt": "b", "key": derived}, {"prompt": "a"}])
    assert load_manifest(path).rejects[0].problems == [f"derived key {derived!r} repeats the key of line 1"]


# --- img2img -----------------------------------------------------------------------------------


def test_image_column_is_read_relative_to_the_manifest(tmp_path: Path, png_bytes, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "run"
    (folder / "inputs").mkdir(parents=True)
    red, blue = png_bytes(color=(255, 0, 0)), png_bytes(color=(0, 0, 255))
    (folder / "inputs" / "red.png").write_bytes(red)
    (folder / "inputs" / "blue.png").write_bytes(blue)
    (folder / "inputs" / "junk.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)  # relative to the manifest, not to the working directory
    path = write_csv(folder / "m.csv", [
        {"prompt": "a", "image": "inputs/red.png", "strength": 0.6},
        {"prompt": "a", "image": "inputs/blue.png", "strength": 0.6},
        {"prompt": "a", "image": "", "strength": 0.6},
        {"prompt": "b", "image": "inputs/red.png", "width": 500},
        {"prompt": "c", "image": "inputs/missing.png"},
        {"prompt": "d", "image": "inputs/junk.png"},
        {"prompt": "e", "image": "inputs/red.png", "strength": 0.6},
    ])
    manifest = load_manifest(Path("run/m.csv"))
    red_row, blue_row, text_row, red_again = manifest.rows
    assert red_row.request.image == red and red_row.request.mode == "img2img"
    assert blue_row.request.image == blue and text_row.request.mode == "txt2img"
    # the image is part of the derived key
    assert len({red_row.key, blue_row.key, text_row.key}) == 3
    assert red_again.request.image == red and red_again.key != red_row.key
    bad = {r.line: r for r in manifest.rejects}
    assert bad[5].row["image"] == "inputs/red.png"  # the path, never the bytes
    assert bad[5].problems[0].startswith("width=500")
    assert bad[6].problems == [f"image={str(Path('run/inputs/missing.png'))!r}: cannot be read (No such file or directory)"]
    assert bad[7].problems == [f"image={str(Path('run/inputs/junk.png'))!r}: not a readable image file: "
                               "no image format recognised"]
    assert path.exists()


def test_an_image_that_is_not_a_path_is_a_problem(tmp_path: Path):
    manifest = load_manifest(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "image": 5}]))
    assert manifest.rejects[0].problems == [
        "image=5: must be the path of an image file, relative to the manifest's folder"]


# --- files the loader refuses ------------------------------------------------------------------


def test_unknown_suffix_missing_file_and_bad_file_are_refused(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"m\.txt: unknown manifest format '\.txt': the formats are "
                                            r"\.jsonl, \.ndjson, \.csv, \.parquet, \.toml"):
        load_manifest(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match=r"nope\.jsonl: cannot be read \(No such file or directory\)"):
        load_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ManifestError, match=r"dir\.csv: is a directory, not a regular file"):
        load_manifest(tmp_path / "dir.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match=r"bad\.parquet: not a Parquet file"):
        load_manifest(tmp_path / "bad.parquet")
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ManifestError, match=r"latin\.jsonl: not UTF-8 text"):
        load_manifest(tmp_path / "latin.jsonl")
    (tmp_path / "bad.toml").write_text("prompts = [")
    with pytest.raises(ManifestError, match=r"bad\.toml: not a TOML file"):
        load_manifest(tmp_path / "bad.toml")


def test_importing_the_manifest_module_loads_no_pyarrow_and_no_torch():
    probe = ("import sys, producer.runs.manifest\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'torch', 'worker', 'diffusers')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- grids -------------------------------------------------------------------------------------


def test_a_grid_expands_to_the_product_in_nesting_order(tmp_path: Path):
    spec = {
        "prompts": ["a red fox", "a lighthouse"],
        "negative_prompts": ["", "blurry"],
        "sizes": ["512x512", [768, 512]],
        "guidance_scales": [5.0, 7.5],
        "steps": [20, 30],
        "num_images": [1, 2],
        "seeds": [1, 2, 3],
        "strength": 0.5,
        "use_compel": True,
    }
    manifest = load_grid(spec, tmp_path)
    assert manifest.rejects == [] and manifest.source is None and manifest.sha256 is None
    assert len(manifest.rows) == 2 * 2 * 2 * 2 * 2 * 2 * 3
    assert [r.line for r in manifest.rows] == list(range(1, 193))
    fields = ("prompt", "negative_prompt", "width", "height", "guidance_scale", "num_inference_steps", "num_images", "seed")
    combos = [tuple(getattr(r.request, f) for f in fields) for r in manifest.rows]
    assert combos[:4] == [
        ("a red fox", "", 512, 512, 5.0, 20, 1, 1),
        ("a red fox", "", 512, 512, 5.0, 20, 1, 2),
        ("a red fox", "", 512, 512, 5.0, 20, 1, 3),
        ("a red fox", "", 512, 512, 5.0, 20, 2, 1),
    ]
    assert combos[96] == ("a lighthouse", "", 512, 512, 5.0, 20, 1, 1)
    assert combos[-1] == ("a lighthouse", "blurry", 768, 512, 7.5, 30, 2, 3)
    assert len(set(combos)) == len(combos)
    assert all(r.request.strength == 0.5 and r.request.use_compel for r in manifest.rows)
    assert len({r.key for r in manifest.rows}) == len(manifest.rows)


def test_grid_axes_not_given_are_not_expanded_and_defaults_apply(tmp_path: Path):
    manifest = load_grid({"prompts": ["a", "b"], "num_images": 2, "width": 512}, tmp_path,
                         {"num_inference_steps": 12, "width": 1024})
    assert [(r.request.prompt, r.request.num_images, r.request.num_inference_steps, r.request.width)
            for r in manifest.rows] == [("a", 2, 12, 512), ("b", 2, 12, 512)]
    assert [r.request.prompt for r in load_grid({"prompt": "one"}, tmp_path).rows] == ["one"]


@pytest.mark.parametrize("seeds, expected", [
    ([5, 9, 1], [5, 9, 1]),
    ({"start": 10, "stop": 14}, [10, 11, 12, 13]),
    ({"start": 0, "count": 3}, [0, 1, 2]),
])
def test_grid_seeds_as_a_list_a_range_or_a_count(tmp_path: Path, seeds: Any, expected: list[int]):
    assert [r.request.seed for r in load_grid({"prompt": "a", "seeds": seeds}, tmp_path).rows] == expected


def test_grid_seeds_from_the_fire_time(tmp_path: Path):
    spec = {"prompt": "a", "seeds": {"from_fire_time": True, "count": 4}}
    first = load_grid(spec, tmp_path, fire_time=FIRE)
    base = int(FIRE.timestamp())
    assert [r.request.seed for r in first.rows] == [base, base + 1, base + 2, base + 3]
    # a firing made twice makes the same rows, with the same keys
    assert [r.key for r in load_grid(spec, tmp_path, fire_time=FIRE).rows] == [r.key for r in first.rows]
    with pytest.raises(ManifestError, match=r"only works for a schedule's firing"):
        load_grid(spec, tmp_path)


def test_grid_sizes_accept_strings_and_pairs_and_refuse_the_rest(tmp_path: Path):
    rows = load_grid({"prompt": "a", "sizes": ["512x768", "1024X256", [256, 320]]}, tmp_path).rows
    assert [(r.request.width, r.request.height) for r in rows] == [(512, 768), (1024, 256), (256, 320)]
    with pytest.raises(ManifestError, match=r"sizes\[1\]='big': a size is \"WxH\""):
        load_grid({"prompt": "a", "sizes": ["512x512", "big"]}, tmp_path)
    # a size out of bounds is a bad row, like any other
    manifest = load_grid({"prompt": "a", "sizes": ["512x500"]}, tmp_path)
    assert manifest.rejects[0].problems[0].startswith("height=500: must be a multiple of 64")
    assert manifest.rejects[0].row == {"prompt": "a", "width": 512, "height": 500}


def test_grid_prompts_file_relative_to_the_base_dir(tmp_path: Path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\n   \na lighthouse at dusk\r\n")
    rows = load_grid({"prompts_file": "prompts.txt", "seeds": [1, 2]}, tmp_path).rows
    assert [(r.request.prompt, r.request.seed) for r in rows] == [
        ("a red fox", 1), ("a red fox", 2), ("a lighthouse at dusk", 1), ("a lighthouse at dusk", 2)]
    with pytest.raises(ManifestError, match=r"missing\.txt: cannot be read"):
        load_grid({"prompts_file": "missing.txt"}, tmp_path)


def test_a_grid_file_is_loaded_from_toml(tmp_path: Path):
    (tmp_path / "prompts.txt").write_text("fox at {time}\nowl\n")
    path = tmp_path / "grid.toml"
    path.write_text('prompts_file = "prompts.txt"\nsizes = ["512x512"]\nseeds = {start = 0, count = 2}\n')
    manifest = load_manifest(path, fire_time=FIRE, schedule="nightly")
    assert manifest.source == str(path) and manifest.sha256 is not None
    assert [(r.line, r.request.prompt, r.request.seed) for r in manifest.rows] == [
        (1, "fox at 06:05", 0), (2, "fox at 06:05", 1), (3, "owl", 0), (4, "owl", 1)]


def test_grid_refuses_unknown_keys_and_bad_specs(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"unknown key 'prompt_list': the known keys are prompts, negative_prompts, "):
        load_grid({"prompt_list": ["a"]}, tmp_path, source="g.toml")
    with pytest.raises(ManifestError, match=r"^g\.toml: give sizes or width, not both"):
        load_grid({"prompt": "a", "sizes": ["512x512"], "width": 512}, tmp_path, source="g.toml")
    with pytest.raises(ManifestError, match=r"^grid: steps must be a non-empty list"):
        load_grid({"prompt": "a", "steps": []}, tmp_path)
    with pytest.raises(ManifestError, match=r"strength is one value for every row"):
        load_grid({"prompt": "a", "strength": [0.5, 0.8]}, tmp_path)
    with pytest.raises(ManifestError, match=r"seeds are a list, \{start"):
        load_grid({"prompt": "a", "seeds": {"start": 0}}, tmp_path)
    with pytest.raises(ManifestError, match=r"give prompts or prompts_file, not both"):
        load_grid({"prompts": ["a"], "prompts_file": "p.txt"}, tmp_path)


def test_a_grid_rejects_rows_with_values_toml_has_but_json_has_not(tmp_path: Path):
    path = tmp_path / "g.toml"
    path.write_text('prompt = "a"\nseeds = [1, 1979-05-27]\n')
    manifest = load_manifest(path)
    assert [r.request.seed for r in manifest.rows] == [1]
    (reject,) = manifest.rejects
    assert reject.line == 2 and reject.row == {"prompt": "a", "seed": "1979-05-27"}
    assert reject.problems[0].startswith("seed=datetime.date(1979, 5, 27): input should be a valid integer")
    write_rejects(manifest.rejects, tmp_path / "rejects.jsonl")


def test_a_grid_past_a_million_rows_is_refused_before_expanding(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"the grid has 1,000,002 rows, more than the bound of 1,000,000"):
        load_grid({"prompts": ["a", "b"], "seeds": {"start": 0, "count": 500_001}}, tmp_path)
    with pytest.raises(ManifestError, match=r"more than the bound of 1,000,000 rows"):
        load_grid({"prompt": "a", "seeds": {"start": 0, "stop": 2**70}}, tmp_path)


# --- placeholders ------------------------------------------------------------------------------


def test_placeholders_are_filled_from_the_fire_time(tmp_path: Path):
    text = "{schedule} {fire_time} {date} {time} {year}-{month}-{day} {hour}:{minute} {other} {"
    assert fill_placeholders(text, FIRE, "nightly", where="x") == (
        "nightly 2026-03-07T06:05:00+01:00 2026-03-07 06:05 2026-03-07 06:05 {other} {")
    spec = {"prompts": ["a fox on {date}"], "negative_prompts": ["{schedule}"], "strength": 0.5}
    row = next(iter(load_grid(spec, tmp_path, fire_time=FIRE, schedule="nightly").rows))
    assert (row.request.prompt, row.request.negative_prompt) == ("a fox on 2026-03-07", "nightly")


def test_placeholders_are_refused_without_a_fire_time(tmp_path: Path):
    assert fill_placeholders("no {placeholder} here", None, None, where="x") == "no {placeholder} here"
    with pytest.raises(ManifestError, match=r"^g\.toml: prompts\[1\] uses \{date\}: placeholders are filled only "
                                            r"when a schedule fires"):
        load_grid({"prompts": ["a", "b {date}"]}, tmp_path, source="g.toml")
    with pytest.raises(ManifestError, match=r"prompts_file uses \{year\}"):
        load_grid({"prompts_file": "p-{year}.txt"}, tmp_path)


def test_hostile_jsonl_lines_are_bad_rows_not_crashes(tmp_path: Path):
    path = write_jsonl(tmp_path / "m.jsonl", ["[" * 100_000, '{"prompt": "a", "seed": ' + "9" * 5000 + "}",
                                              {"prompt": "fine"}])
    manifest = load_manifest(path)
    assert [r.line for r in manifest.rows] == [3]
    assert [r.problems[0][:40] for r in manifest.rejects] == [
        "not a JSON object: nested too deeply", "not a JSON object: Exceeds the limit (43"]
    assert all(len(r.row["text"]) == 200 for r in manifest.rejects)


def test_the_writer_reads_back_the_validated_rows_and_refuses_an_image_changed_since(tmp_path: Path, png_bytes):
    import gc

    (tmp_path / "in.png").write_bytes(png_bytes())
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": f"a hut {i}", "image": "in.png"} for i in range(3)])
    manifest = load_manifest(path)
    spool = Path(f"/proc/self/fd/{manifest._spool.fd}")  # the validated rows, in an unlinked file
    assert spool.exists() and spool.readlink().name.endswith("(deleted)")
    assert [row.request.image for row in manifest.rows] == [png_bytes()] * 3
    path.write_text("")  # the manifest is not read again: its rows were kept as validated
    assert [row.request.prompt for row in manifest.rows] == ["a hut 0", "a hut 1", "a hut 2"]
    (tmp_path / "in.png").write_bytes(png_bytes(color=(1, 2, 3)))
    with pytest.raises(ManifestError, match=r"in\.png'?: the file changed while the manifest was enqueued"):
        list(manifest.rows)
    del manifest
    gc.collect()
    assert not spool.exists()


def test_a_temporary_folder_that_refuses_the_rows_is_the_hosts_fault_not_the_manifests(tmp_path: Path, monkeypatch):
    import tempfile

    from models.errors import BadInput
    from producer.runs.manifest import SpoolFailed

    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a cat"}])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(SpoolFailed, match=r"m\.jsonl: no temporary file for its rows \(No such file or directory\)") as refused:
        load_manifest(path)
    assert not isinstance(refused.value, BadInput)  # the CLI exits 1, not 2: the file is fine
