"""Manifests: the rows of a run, read from a file or expanded from a grid, every one validated
before anything is written.

Formats, by suffix: JSONL (.jsonl, .ndjson), CSV (.csv), Parquet (.parquet), and TOML (.toml) for a
grid, the cartesian product of a few lists of values. A row may give any request field, plus `key`
(its stable key within the run) and `priority` ("interactive" or "bulk"); its `image` is the path
of a file, relative to the manifest's folder. A bad row never raises: it becomes a Rejected, with
one line per problem, beside the good rows, and the caller decides what to do.

Keys are stable, so that enqueueing the same manifest again finds the rows it already made: a
row's own `key`, else one derived from its validated request (see `_Rows._derived_key`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import re
import stat
import tomllib
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from models.errors import InvalidRequest, SdqueueError
from models.request import GenerationRequest, check_image, parse_request
from models.tables import Priority

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".csv", ".parquet", ".toml")
MAX_KEY_CHARS = 255
MAX_GRID_ROWS = 1_000_000
# Bad rows format_rejects shows before it only counts the rest.
SHOWN_REJECTS = 50
PRIORITIES = tuple(p.value for p in Priority)

# CSV cells are text: each typed request field's converter, and what a cell that fails it is not.
# Every other field stays text. A bool is spelled as people write them in spreadsheets.
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _bool(text: str) -> bool:
    return _BOOLS[text.strip().lower()]


CSV_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "num_images": (int, "not a whole number"),
    "num_inference_steps": (int, "not a whole number"),
    "width": (int, "not a whole number"),
    "height": (int, "not a whole number"),
    "seed": (int, "not a whole number"),
    "guidance_scale": (float, "not a number"),
    "strength": (float, "not a number"),
    "use_compel": (_bool, "not one of true, false, 1, 0, yes, no"),
}

# Grid axes, outermost first, and the request fields each one sets.
GRID_AXES: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "negative_prompts": ("negative_prompt",),
    "sizes": ("width", "height"),
    "guidance_scales": ("guidance_scale",),
    "steps": ("num_inference_steps",),
    "num_images": ("num_images",),  # a list is the axis; one number is the plain request field
    "seeds": ("seed",),
}
GRID_KEYS = (*GRID_AXES, "prompts_file", *(f for f in GenerationRequest.model_fields if f not in GRID_AXES))

_PLACEHOLDER = re.compile(r"\{(schedule|fire_time|date|time|year|month|day|hour|minute)\}")
_PLACEHOLDER_FORMATS = {"date": "%Y-%m-%d", "time": "%H:%M", "year": "%Y", "month": "%m", "day": "%d",
                        "hour": "%H", "minute": "%M"}
_SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


class ManifestError(SdqueueError):
    """A manifest or grid that cannot be read at all: unreadable, of an unknown format, or a bad
    grid spec. (A bad row is not one: it is a Rejected.) Nothing was written or enqueued."""


@dataclass(frozen=True)
class RunRow:
    line: int  # JSONL and CSV: the line in the file; Parquet: the row's index; grid: its index in the expansion (1-based)
    key: str  # stable key of the row within its run
    request: GenerationRequest  # validated; for img2img rows .image holds the bytes
    priority: str | None  # the row's own `priority` column, else None


@dataclass(frozen=True)
class Rejected:
    line: int
    problems: list[str]  # one line per problem, naming the field, the value and the bound
    row: dict[str, Any]  # the raw row as read, JSON-serialisable: an image is its path, never its bytes


@dataclass
class Manifest:
    source: str | None  # the file path as given (None for an inline grid)
    sha256: str | None  # sha256 hex of the file's bytes (None for an inline grid)
    rows: list[RunRow]
    rejects: list[Rejected]


def load_manifest(
    path: Path,
    defaults: dict[str, Any] | None = None,
    *,
    fire_time: datetime | None = None,
    schedule: str | None = None,
) -> Manifest:
    """Read and validate every row of the manifest at `path`, by its suffix.

    `defaults` (request fields) fill the fields a row does not give; then the request schema's own
    defaults apply. `fire_time` and `schedule` fill a grid's placeholders.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest format {suffix or '(no suffix)'!r}: "
                            f"the formats are {', '.join(SUFFIXES)}")
    data = _read(path)
    sha256 = hashlib.sha256(data).hexdigest()
    if suffix == ".toml":
        try:
            spec = tomllib.loads(_text(path, data))
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(f"{path}: not a TOML file ({exc})") from None
        return load_grid(spec, path.parent, defaults, fire_time=fire_time, schedule=schedule, source=str(path),
                         sha256=sha256)
    # JSON and CSV rows are JSON already; Parquet values may be bytes, times or decimals.
    rows = _Rows(path.parent, defaults, plain_rejects=suffix == ".parquet")
    if suffix in JSONL_SUFFIXES:
        _read_jsonl(path, data, rows)
    elif suffix == ".csv":
        _read_csv(path, data, rows)
    else:
        _read_parquet(path, data, rows)
    return Manifest(str(path), sha256, rows.rows, rows.rejects)


def load_grid(
    spec: dict[str, Any],
    base_dir: Path,
    defaults: dict[str, Any] | None = None,
    *,
    fire_time: datetime | None = None,
    schedule: str | None = None,
    source: str | None = None,
    sha256: str | None = None,
) -> Manifest:
    """Expand a grid (the keys of a TOML grid file) into validated rows, outermost axis first:
    prompts, negative_prompts, sizes, guidance_scales, steps, num_images, seeds.

    Any other request field is one value for every row. A relative `prompts_file` or `image` is
    found in `base_dir`.
    """
    where = source or "grid"
    # 1. the keys
    if not isinstance(spec, dict):
        raise ManifestError(f"{where}: a grid is a table of keys, not {type(spec).__name__}")
    for name in spec:
        if name not in GRID_KEYS:
            raise ManifestError(f"{where}: unknown key {name!r}: the known keys are {', '.join(GRID_KEYS)}")
    spec = dict(spec)
    if "prompts" in spec and "prompts_file" in spec:
        raise ManifestError(f"{where}: give prompts or prompts_file, not both")
    if "prompts_file" in spec:
        spec["prompts"] = _prompts_file(spec.pop("prompts_file"), base_dir, fire_time, schedule, where)
    # 2. the axes, each a sequence of values (a range is never spelled out)
    fields: list[tuple[str, ...]] = []
    axes: list[Sequence[Any]] = []
    for axis, names in GRID_AXES.items():
        if axis not in spec or (axis == "num_images" and not isinstance(spec[axis], list)):
            continue  # not given; or num_images as one number: the request field, not the axis
        clash = [name for name in names if name in spec and name != axis]
        if clash:
            raise ManifestError(f"{where}: give {axis} or {clash[0]}, not both")
        values = spec.pop(axis)
        if axis == "seeds":
            values = _seeds(values, fire_time, where)
        elif not isinstance(values, list) or not values:
            raise ManifestError(f"{where}: {axis} must be a non-empty list of values, not {values!r}")
        elif axis == "sizes":
            values = [_size(value, where, index) for index, value in enumerate(values)]
        elif axis in ("prompts", "negative_prompts"):
            values = [fill_placeholders(value, fire_time, schedule, where=f"{where}: {axis}[{index}]")
                      if isinstance(value, str) else value for index, value in enumerate(values)]
        fields.append(names)
        axes.append(values)
    # 3. the rest: one value of a request field for every row
    for name, value in spec.items():
        if isinstance(value, (list, dict)):
            raise ManifestError(f"{where}: {name} is one value for every row, not {value!r} "
                                f"(the axes are {', '.join(GRID_AXES)})")
        if name in ("prompt", "negative_prompt") and isinstance(value, str):
            spec[name] = fill_placeholders(value, fire_time, schedule, where=f"{where}: {name}")
    # 4. the size, before a row is made
    size = math.prod(len(values) for values in axes)
    if size > MAX_GRID_ROWS:
        raise ManifestError(f"{where}: the grid has {size:,} rows, more than the bound of {MAX_GRID_ROWS:,}")
    # 5. the rows (TOML has dates and times, which a reject's row holds as text)
    rows = _Rows(base_dir, defaults, plain_rejects=True)
    for line, combination in enumerate(itertools.product(*axes), start=1):
        row = dict(spec)
        for names, value in zip(fields, combination):
            if len(names) == 1:
                row[names[0]] = value
            else:
                row.update(zip(names, value))
        rows.add(line, row)
    return Manifest(source, sha256, rows.rows, rows.rejects)


def format_rejects(rejects: list[Rejected], limit: int = SHOWN_REJECTS) -> str:
    """One line per problem ("line 7: width=500: must be ..."), of the first `limit` bad rows."""
    lines = [f"line {reject.line}: {problem}" for reject in rejects[:limit] for problem in reject.problems]
    if len(rejects) > limit:
        more = len(rejects) - limit
        lines.append(f"... and {more} more bad row{'s' if more != 1 else ''}")
    return "\n".join(lines)


def write_rejects(rejects: list[Rejected], path: Path) -> None:
    """Every bad row as one JSON object a line: {"line": N, "problems": [...], "row": {...}}."""
    with path.open("w", encoding="utf-8") as out:
        for reject in rejects:
            out.write(json.dumps({"line": reject.line, "problems": reject.problems, "row": reject.row}) + "\n")


def fill_placeholders(text: str, fire_time: datetime | None, schedule: str | None, *, where: str) -> str:
    """`text` with {schedule}, {fire_time} (ISO 8601), {date} (YYYY-MM-DD), {time} (HH:MM), {year},
    {month}, {day}, {hour} and {minute} (two digits) filled in, from fire_time in its own time
    zone. Other braces are left alone. `where` names the text in a refusal."""
    if "{" not in text:
        return text

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if fire_time is None or (name == "schedule" and schedule is None):
            raise ManifestError(f"{where} uses {{{name}}}: placeholders are filled only when a schedule fires")
        if name == "schedule":
            return str(schedule)
        if name == "fire_time":
            return fire_time.isoformat()
        return fire_time.strftime(_PLACEHOLDER_FORMATS[name])

    return _PLACEHOLDER.sub(value, text)


class _Rows:
    """Rows validated one by one into good rows (with their keys) and rejects."""

    def __init__(self, base_dir: Path, defaults: dict[str, Any] | None, *, plain_rejects: bool = False):
        self.base_dir = base_dir
        self.defaults = dict(defaults or {})
        self.plain_rejects = plain_rejects  # whether a rejected row needs _plain to be JSON
        self.rows: list[RunRow] = []
        self.rejects: list[Rejected] = []
        self._keys: dict[str, int] = {}  # every key given or derived so far, and its first line
        self._digests: dict[str, int] = {}  # derived keys so far, by digest
        self._images: dict[str, bytes | InvalidRequest] = {}  # by path: each file read and checked once
        self._checked: dict[bytes, str] = {}  # image bytes checked, and their sha256

    def reject(self, line: int, problems: list[str], row: dict[str, Any]) -> None:
        self.rejects.append(Rejected(line, problems, _plain(row) if self.plain_rejects else row))

    def add(self, line: int, row: dict[str, Any], given: dict[str, Any] | None = None,
            problems: list[str] | None = None) -> None:
        """Validate one row: `row` as read, `given` its values in Python types (if not the same),
        `problems` those found converting them."""
        values = dict(row if given is None else given)
        problems = problems or []
        # 1. the columns that are not request fields
        key = values.pop("key", None)
        if key is not None:
            key = self._explicit_key(key, line, problems)
        priority = values.pop("priority", None)
        if priority is not None and priority not in PRIORITIES:
            problems.append(f"priority={_shown(priority)}: must be one of {', '.join(PRIORITIES)}")
        # 2. the input image: the row's path, else bytes from the defaults
        image = values.pop("image", None)
        if self.defaults:
            values = {**self.defaults, **values}
            if image is None:
                image = values.pop("image", None)
        data = None
        if image is not None:
            try:
                data = self._image(image)
            except InvalidRequest as exc:
                problems.extend(exc.problems)
        # 3. the request
        try:
            request = parse_request(values)
        except InvalidRequest as exc:
            problems.extend(exc.problems)
        if problems:
            self.reject(line, problems, row)
            return
        if data is not None:
            # The bytes passed check_image, the image field's own validator, once per file: a
            # thousand rows of one input image decode it once, not a thousand times.
            request = request.model_copy(update={"image": data})
        # 4. the key
        if key is None:
            key = self._derived_key(request)
            first = self._keys.setdefault(key, line)
            if first != line:
                self.reject(line, [f"derived key {key!r} repeats the key of line {first}"], row)
                return
        self.rows.append(RunRow(line, key, request, priority))

    def _explicit_key(self, key: Any, line: int, problems: list[str]) -> str | None:
        if isinstance(key, bool) or not isinstance(key, (str, int)) or not 1 <= len(str(key)) <= MAX_KEY_CHARS:
            problems.append(f"key={_shown(key)}: must be text or a whole number, of 1 to {MAX_KEY_CHARS} characters")
            return None
        key = str(key)
        first = self._keys.setdefault(key, line)
        if first != line:
            problems.append(f"key {_shown(key)} repeats line {first}")
        return key

    def _derived_key(self, request: GenerationRequest) -> str:
        """The sha256 of the request's parameters (and its image's sha256), cut to 24 hex digits,
        then how many earlier rows had the same: a duplicated row is two jobs, and rows added
        elsewhere leave the others' keys alone."""
        text = json.dumps(request.parameters(), sort_keys=True, separators=(",", ":"))
        if request.image is not None:
            text += "|" + self._check(request.image)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        n = self._digests.get(digest, 0)
        self._digests[digest] = n + 1
        return f"{digest}-{n}"

    def _image(self, image: Any) -> bytes:
        """The bytes of a row's image file (a path relative to the manifest's folder), checked."""
        if isinstance(image, bytes):  # from the defaults
            self._check(image)
            return image
        if not isinstance(image, str) or not image:
            raise InvalidRequest([f"image={_shown(image)}: must be the path of an image file, "
                                  "relative to the manifest's folder"])
        path = self.base_dir / image
        found = self._images.get(str(path))
        if found is None:
            from producer.cli import read_image_file

            try:
                found = read_image_file(path)
                self._check(found, where=f"image={str(path)!r}")
            except InvalidRequest as exc:
                found = exc
            self._images[str(path)] = found
        if isinstance(found, InvalidRequest):
            raise found
        return found

    def _check(self, data: bytes, where: str | None = None) -> str:
        """check_image once per distinct bytes; their sha256."""
        sha256 = self._checked.get(data)
        if sha256 is None:
            try:
                check_image(data)
            except ValueError as exc:
                raise InvalidRequest([f"{where or f'image=<{len(data)} bytes>'}: {exc}"]) from None
            sha256 = self._checked[data] = hashlib.sha256(data).hexdigest()
        return sha256


def _read(path: Path) -> bytes:
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or a device would block or never end
            raise ManifestError(f"{path}: not a regular file")
        return path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's byte order mark is not part of the header
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: Path, data: bytes, rows: _Rows) -> None:
    # "\n" only: str.splitlines would also split at U+2028, which JSON allows inside a string.
    for line, text in enumerate(_text(path, data).split("\n"), start=1):
        if not text or text.isspace():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            rows.reject(line, [f"not a JSON object: {exc.msg} at column {exc.colno}"], {"text": _cut(text)})
            continue
        except (ValueError, RecursionError) as exc:  # a number of over 4300 digits; arrays in arrays in ...
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            rows.reject(line, [f"not a JSON object: {reason}"], {"text": _cut(text)})
            continue
        if not isinstance(row, dict):
            rows.reject(line, [f"not a JSON object: a JSON {_json_kind(row)}"], {"text": _cut(text)})
            continue
        rows.add(line, row)


def _read_csv(path: Path, data: bytes, rows: _Rows) -> None:
    reader = csv.reader(io.StringIO(_text(path, data), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [name.strip() for name in header]
        if not any(names):
            raise ManifestError(f"{path}: line 1: the header row names no columns")
        repeated = next((name for name in names if name and names.count(name) > 1), None)
        if repeated is not None:
            raise ManifestError(f"{path}: line 1: column {repeated!r} appears twice in the header")
        types = [CSV_TYPES.get(name) for name in names]
        end = reader.line_num
        for cells in reader:
            # A quoted cell may span lines: a row's line is the one it starts on.
            line, end = end + 1, reader.line_num
            if not cells:
                continue
            row = dict(zip(names, cells))
            given: dict[str, Any] = {}
            problems = []
            if len(cells) > len(names):
                problems.append(f"has {len(cells)} cells, the header names {len(names)} columns")
            for name, kind, text in zip(names, types, cells):
                if text == "":  # not given, but for an empty negative prompt
                    if name == "negative_prompt":
                        given[name] = ""
                elif kind is None:
                    given[name] = text
                else:
                    try:
                        given[name] = kind[0](text)
                    except (ValueError, KeyError):
                        problems.append(f"{name}={_shown(text)}: {kind[1]}")
            rows.add(line, row, given, problems)
    except csv.Error as exc:
        raise ManifestError(f"{path}: line {reader.line_num}: not CSV ({exc})") from None


def _read_parquet(path: Path, data: bytes, rows: _Rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a Parquet file ({exc})") from None
    for line, record in enumerate(table.to_pylist(), start=1):
        rows.add(line, {name: value for name, value in record.items() if value is not None})  # null: not given


def _plain(value: Any) -> Any:
    """A value as JSON can hold it: bytes as their size, times in ISO 8601, anything else as text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _prompts_file(name: Any, base_dir: Path, fire_time: datetime | None, schedule: str | None,
                  where: str) -> list[str]:
    """The prompts of a file, one a line (blank lines skipped), placeholders filled."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: prompts_file must be the path of a text file, not {name!r}")
    path = base_dir / fill_placeholders(name, fire_time, schedule, where=f"{where}: prompts_file")
    text = _text(path, _read(path))
    prompts = [fill_placeholders(line, fire_time, schedule, where=f"{path}: line {number}")
               for number, line in enumerate(text.splitlines(), start=1) if line and not line.isspace()]
    if not prompts:
        raise ManifestError(f"{path}: no prompts: the file has only blank lines")
    return prompts


def _size(value: Any, where: str, index: int) -> tuple[Any, Any]:
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        return int(match[1]), int(match[2])
    if isinstance(value, list) and len(value) == 2:
        return value[0], value[1]  # the request's bounds check them, row by row
    raise ManifestError(f'{where}: sizes[{index}]={value!r}: a size is "WxH" (e.g. "768x512") or [W, H]')


def _seeds(spec: Any, fire_time: datetime | None, where: str) -> Sequence[Any]:
    """A list of seeds, or a range: {start, stop} (stop exclusive), {start, count} or
    {from_fire_time = true, count} (the same seeds for a firing made twice)."""
    forms = "a list, {start = S, stop = E}, {start = S, count = N} or {from_fire_time = true, count = N}"
    if isinstance(spec, list):
        if not spec:
            raise ManifestError(f"{where}: seeds must not be empty")
        return spec
    if not isinstance(spec, dict) or set(spec) not in ({"start", "stop"}, {"start", "count"},
                                                       {"from_fire_time", "count"}):
        raise ManifestError(f"{where}: seeds={spec!r}: seeds are {forms}")
    for name, value in spec.items():
        if name != "from_fire_time" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ManifestError(f"{where}: seeds.{name}={value!r}: must be a whole number")
    if "from_fire_time" in spec:
        if spec["from_fire_time"] is not True:
            raise ManifestError(f"{where}: seeds.from_fire_time={spec['from_fire_time']!r}: must be true")
        if fire_time is None:
            raise ManifestError(f"{where}: seeds = {{from_fire_time = true}} only works for a schedule's firing: "
                                "there is no fire time here")
        start = int(fire_time.timestamp())
    else:
        start = spec["start"]
    stop = spec["stop"] if "stop" in spec else start + spec["count"]
    if stop <= start:
        raise ManifestError(f"{where}: seeds={spec!r}: gives no seeds")
    if stop - start > MAX_GRID_ROWS:  # before len(), which fails past 2**63
        raise ManifestError(f"{where}: seeds={spec!r}: {stop - start:,} seeds, more than the bound of "
                            f"{MAX_GRID_ROWS:,} rows")
    return range(start, stop)


def _shown(value: Any) -> str:
    """A value as a refusal shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_kind(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
