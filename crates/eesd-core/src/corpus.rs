//! Parquet in and out: prompt corpora (`data/corpora/*.parquet`, schema in
//! scripts/make_corpora.py) and teacher data (the base model's own answers, written by
//! `eesd-train gen`, read by `eesd-train distill`).
//!
//! Teacher data schema (one row per prompt; made elsewhere, e.g. by a serving engine, is fine
//! as long as it follows it):
//!   id string, prompt string, response string,
//!   prompt_ids list<uint32> (chat-formatted), response_ids list<uint32>,
//!   base_fingerprint string (see `fingerprint.rs`).

use crate::error::{Error, Result};
use arrow::array::{
    Array, ArrayRef, ListArray, ListBuilder, RecordBatch, StringArray, UInt32Builder,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {e}", path.display()))
}

/// `spec` is a parquet file, a folder (all `*.parquet` in it) or a glob with `*` in the file name.
pub fn expand(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    let mut files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else if path.is_dir() {
        list(path, "*.parquet")?
    } else if spec.contains('*') {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let pat = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        list(dir, &pat)?
    } else {
        return Err(Error::Input(format!(
            "no such parquet file, folder or glob: {spec}"
        )));
    };
    files.sort();
    if files.is_empty() {
        return Err(Error::Input(format!("{spec} matches no parquet files")));
    }
    Ok(files)
}

fn list(dir: &Path, pattern: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| glob_match(pattern, &n.to_string_lossy()))
        })
        .collect())
}

/// `*` matches any run of characters; everything else literally.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || !name.ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Every record batch of `path`. The file's embedded Arrow schema is not read (the columns'
/// types follow from the parquet schema alone): decoding a malformed one panics inside
/// arrow-ipc (found by `just fuzz`). A panic anywhere else in the readers becomes an error
/// naming the file.
fn batches(path: &Path) -> Result<Vec<RecordBatch>> {
    check_footer(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let read = || -> Result<Vec<RecordBatch>> {
        let options = ArrowReaderOptions::new().with_skip_arrow_metadata(true);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)
            .map_err(|e| perr(path, e))?
            .build()
            .map_err(|e| perr(path, e))?;
        reader.map(|b| b.map_err(|e| perr(path, e))).collect()
    };
    quietly(read).unwrap_or_else(|_| {
        Err(perr(
            path,
            "not a readable parquet file (its reader failed)",
        ))
    })
}

/// Footers larger than this are refused: ours are a few KB, and the reader allocates for
/// every element a footer declares.
const MAX_FOOTER: u64 = 8 << 20;

/// Elements a footer's list, set or map may declare. Bounding them by the bytes left is not
/// enough: an element as small as one byte (an empty struct) is decoded into a row group or
/// column chunk of a few KB, so a list of 8 M of them in an 8 MB footer asked for 25.7 GB
/// (found by `just fuzz` after the bytes bound). Our files' lists are schema fields, row
/// groups and column chunks: tens to thousands.
const MAX_LIST: u64 = 1 << 16;

/// Checks the file's footer before the parquet reader sees it: the `PAR1` magic, a metadata
/// length inside the file, and thrift metadata whose every list, set and map holds no more
/// elements than the bytes after its header (each element takes at least one) nor more than
/// [`MAX_LIST`]. The reader
/// (parquet 56) reserves memory for a list's declared length before reading it: a malformed
/// footer that `just fuzz` found declared a list of 32 GB worth of schema elements and aborted
/// the process, which no `catch_unwind` can turn into an error.
fn check_footer(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let bad = |why: &str| Err(perr(path, format!("not a readable parquet file ({why})")));
    if len < 12 {
        return bad("shorter than a parquet header and footer");
    }
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::End(-8))
        .and_then(|_| f.read_exact(&mut tail))
        .map_err(|e| Error::io(path, e))?;
    if &tail[4..] != b"PAR1" {
        return bad("no PAR1 magic at its end");
    }
    let meta_len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if meta_len + 12 > len {
        return bad(&format!(
            "its footer claims {meta_len} bytes of a {len}-byte file"
        ));
    }
    if meta_len > MAX_FOOTER {
        return bad(&format!("a footer of {meta_len} bytes"));
    }
    let mut meta = vec![0u8; meta_len as usize];
    f.seek(SeekFrom::End(-8 - meta_len as i64))
        .and_then(|_| f.read_exact(&mut meta))
        .map_err(|e| Error::io(path, e))?;
    let mut walk = Compact { b: &meta, i: 0 };
    match walk.structure(Thrift::File, 0) {
        Some(()) => Ok(()),
        None => bad("malformed footer metadata"),
    }
}

/// A walk over thrift compact-protocol bytes that checks lengths and allocates nothing.
struct Compact<'a> {
    b: &'a [u8],
    i: usize,
}

impl Compact<'_> {
    fn left(&self) -> u64 {
        (self.b.len() - self.i) as u64
    }

    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.i)?;
        self.i += 1;
        Some(v)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.left() {
            return None;
        }
        self.i += n as usize;
        Some(())
    }

    /// A struct the parquet reader will decode as `s`: every field it knows must come with the
    /// wire type it will read it as. The reader (parquet 56's generated thrift code) does not
    /// check: given an integer where it expects a list, it reads the integer's bytes as a list
    /// header and reserves memory for whatever count they spell (`just fuzz` found 25.7 GB).
    /// Fields it does not know it skips by their wire type, as this walk does.
    fn structure(&mut self, s: Thrift, depth: usize) -> Option<()> {
        if depth > 32 {
            return None;
        }
        let mut id = 0i64;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Some(());
            }
            id = match h >> 4 {
                0 => {
                    let z = self.varint()?;
                    (z >> 1) as i64 ^ -((z & 1) as i64)
                }
                delta => id + delta as i64,
            };
            let wire = h & 0x0f;
            match (s.field(id), wire) {
                (None, 1 | 2) => {} // a bool field's value is its type
                (None, ty) => self.value(ty, Thrift::Any, depth)?,
                (Some(Want::One(BOOL)), 1 | 2) => {}
                (Some(Want::One(want)), ty) if ty == want && want != BOOL => {
                    self.value(ty, Thrift::Any, depth)?
                }
                (Some(Want::Struct(child)), STRUCT) => self.structure(child, depth + 1)?,
                (Some(Want::List(elem, child)), LIST) => self.list(Some((elem, child)), depth)?,
                _ => return None,
            }
        }
    }

    /// A list or set; with `want`, its declared element type must be the one the reader
    /// reads, and struct elements are walked as `want`'s struct.
    fn list(&mut self, want: Option<(u8, Thrift)>, depth: usize) -> Option<()> {
        let h = self.byte()?;
        let mut n = (h >> 4) as u64;
        if n == 15 {
            n = self.varint()?;
        }
        if n > self.left() || n > MAX_LIST {
            return None;
        }
        let (elem, child) = match want {
            Some((elem, child)) if elem == h & 0x0f => (elem, child),
            Some(_) => return None,
            None => (h & 0x0f, Thrift::Any),
        };
        (0..n).try_for_each(|_| self.value(elem, child, depth + 1))
    }

    fn value(&mut self, ty: u8, child: Thrift, depth: usize) -> Option<()> {
        match ty {
            1..=3 => self.skip(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.skip(8),
            8 => {
                let n = self.varint()?;
                self.skip(n)
            }
            LIST | 10 => self.list(None, depth),
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Some(());
                }
                let kv = self.byte()?;
                if n > self.left() / 2 || n > MAX_LIST {
                    return None;
                }
                (0..n).try_for_each(|_| {
                    self.value(kv >> 4, Thrift::Any, depth + 1)?;
                    self.value(kv & 0x0f, Thrift::Any, depth + 1)
                })
            }
            STRUCT => self.structure(child, depth + 1),
            _ => None,
        }
    }
}

// Thrift compact wire types the footer check compares.
const BOOL: u8 = 1;
const I16: u8 = 4;
const I32: u8 = 5;
const I64: u8 = 6;
const BIN: u8 = 8;
const LIST: u8 = 9;
const STRUCT: u8 = 12;

/// What the parquet reader reads a field as.
#[derive(Clone, Copy)]
enum Want {
    One(u8),
    Struct(Thrift),
    /// Element wire type, and the element struct when it is one.
    List(u8, Thrift),
}

/// The footer's structs whose fields the reader reads as lists (or holds such a struct), from
/// parquet.thrift as parquet 56 decodes it; `Any` is walked by wire types alone (the rest:
/// logical types, bounding boxes, empty unions, which hold no list).
#[derive(Clone, Copy)]
enum Thrift {
    File,
    Schema,
    RowGroup,
    Sorting,
    ColumnOrder,
    Encryption,
    Aes,
    Chunk,
    Crypto,
    ColumnKey,
    ColumnMeta,
    KeyValue,
    Stats,
    PageStats,
    SizeStats,
    Geo,
    Any,
}

impl Thrift {
    fn field(self, id: i64) -> Option<Want> {
        use Thrift::*;
        use Want::{List as L, One, Struct as St};
        Some(match (self, id) {
            (File, 1) => One(I32),
            (File, 2) => L(STRUCT, Schema),
            (File, 3) => One(I64),
            (File, 4) => L(STRUCT, RowGroup),
            (File, 5) => L(STRUCT, KeyValue),
            (File, 6 | 9) => One(BIN),
            (File, 7) => L(STRUCT, ColumnOrder),
            (File, 8) => St(Encryption),
            (Schema, 1 | 2 | 3 | 5 | 6 | 7 | 8 | 9) => One(I32),
            (Schema, 4) => One(BIN),
            (Schema, 10) => St(Any),
            (RowGroup, 1) => L(STRUCT, Chunk),
            (RowGroup, 2 | 3 | 5 | 6) => One(I64),
            (RowGroup, 4) => L(STRUCT, Sorting),
            (RowGroup, 7) => One(I16),
            (Sorting, 1) => One(I32),
            (Sorting, 2 | 3) => One(BOOL),
            (ColumnOrder, 1) => St(Any),
            (Encryption, 1 | 2) => St(Aes),
            (Aes, 1 | 2) => One(BIN),
            (Aes, 3) => One(BOOL),
            (Chunk, 1 | 9) => One(BIN),
            (Chunk, 2 | 4 | 6) => One(I64),
            (Chunk, 3) => St(ColumnMeta),
            (Chunk, 5 | 7) => One(I32),
            (Chunk, 8) => St(Crypto),
            (Crypto, 1) => St(Any),
            (Crypto, 2) => St(ColumnKey),
            (ColumnKey, 1) => L(BIN, Any),
            (ColumnKey, 2) => One(BIN),
            (ColumnMeta, 1 | 4 | 15) => One(I32),
            (ColumnMeta, 2) => L(I32, Any),
            (ColumnMeta, 3) => L(BIN, Any),
            (ColumnMeta, 5 | 6 | 7 | 9 | 10 | 11 | 14) => One(I64),
            (ColumnMeta, 8) => L(STRUCT, KeyValue),
            (ColumnMeta, 12) => St(Stats),
            (ColumnMeta, 13) => L(STRUCT, PageStats),
            (ColumnMeta, 16) => St(SizeStats),
            (ColumnMeta, 17) => St(Geo),
            (KeyValue, 1 | 2) => One(BIN),
            (Stats, 1 | 2 | 5 | 6) => One(BIN),
            (Stats, 3 | 4) => One(I64),
            (Stats, 7 | 8) => One(BOOL),
            (PageStats, 1..=3) => One(I32),
            (SizeStats, 1) => One(I64),
            (SizeStats, 2 | 3) => L(I64, Any),
            (Geo, 1) => St(Any),
            (Geo, 2) => L(I32, Any),
            _ => return None,
        })
    }
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `f` with a panic caught and not printed: the parquet readers panic on some malformed files
/// (found by `just fuzz`), and the user should get the error, not a panic message. Panics
/// elsewhere still reach the hook that was installed before.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info)
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    r
}

fn string_col<'a>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a StringArray> {
    let have: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    b.column_by_name(name)
        .ok_or_else(|| {
            perr(
                path,
                format!("no column `{name}` (columns: {})", have.join(", ")),
            )
        })?
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| perr(path, format!("column `{name}` is not a string column")))
}

fn ids_col<'a>(b: &'a RecordBatch, name: &str, path: &Path) -> Result<&'a ListArray> {
    b.column_by_name(name)
        .ok_or_else(|| perr(path, format!("no column `{name}`")))?
        .as_any()
        .downcast_ref::<ListArray>()
        .ok_or_else(|| perr(path, format!("column `{name}` is not list<uint32>")))
}

/// A prompt of a corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub id: String,
    pub prompt: String,
}

/// Reads `id` and `column` (the prompt text) from every file of `spec`, in file order.
pub fn read_prompts(spec: &str, column: &str) -> Result<Vec<PromptRow>> {
    let mut out = Vec::new();
    for path in expand(spec)? {
        for b in batches(&path)? {
            let ids = string_col(&b, "id", &path)?;
            let text = string_col(&b, column, &path)?;
            for i in 0..b.num_rows() {
                if text.is_null(i) {
                    continue;
                }
                out.push(PromptRow {
                    id: ids.value(i).to_string(),
                    prompt: text.value(i).to_string(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Input(format!("{spec}: the corpus holds no prompts")));
    }
    Ok(out)
}

/// Writes a prompt corpus (`id`, `prompt`) to `path` atomically: the smallest file
/// [`read_prompts`] takes (scripts/make_corpora.py writes more columns).
pub fn write_prompts(path: &Path, rows: &[(&str, &str)]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
    ]));
    let col = |f: fn(&(&str, &str)) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![col(|r| r.0.into()), col(|r| r.1.into())],
    )
    .map_err(|e| perr(path, e))?;
    write_batch(path, schema, &batch)
}

/// Writes one record batch to `path` through a temporary file renamed over it.
fn write_batch(path: &Path, schema: Arc<Schema>, batch: &RecordBatch) -> Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = ArrowWriter::try_new(file, schema, None).map_err(|e| perr(path, e))?;
    w.write(batch).map_err(|e| perr(path, e))?;
    w.close().map_err(|e| perr(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One teacher example: the base model's answer to a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherRow {
    pub id: String,
    pub prompt: String,
    pub response: String,
    pub prompt_ids: Vec<u32>,
    pub response_ids: Vec<u32>,
    pub base_fingerprint: String,
}

fn teacher_schema() -> Arc<Schema> {
    let ids = || DataType::List(Arc::new(Field::new("item", DataType::UInt32, true)));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new("response", DataType::Utf8, false),
        Field::new("prompt_ids", ids(), false),
        Field::new("response_ids", ids(), false),
        Field::new("base_fingerprint", DataType::Utf8, false),
    ]))
}

/// Writes `rows` to `path` atomically (temporary file, then rename).
pub fn write_teacher(path: &Path, rows: &[TeacherRow]) -> Result<()> {
    let strings = |f: &dyn Fn(&TeacherRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let lists = |f: &dyn Fn(&TeacherRow) -> &[u32]| -> ArrayRef {
        let mut b = ListBuilder::new(UInt32Builder::new());
        for r in rows {
            b.values().append_slice(f(r));
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let batch = RecordBatch::try_new(
        teacher_schema(),
        vec![
            strings(&|r| &r.id),
            strings(&|r| &r.prompt),
            strings(&|r| &r.response),
            lists(&|r| &r.prompt_ids),
            lists(&|r| &r.response_ids),
            strings(&|r| &r.base_fingerprint),
        ],
    )
    .map_err(|e| perr(path, e))?;
    write_batch(path, teacher_schema(), &batch)
}

fn list_values(l: &ListArray, i: usize, path: &Path) -> Result<Vec<u32>> {
    let v = l.value(i);
    let v = v
        .as_any()
        .downcast_ref::<arrow::array::UInt32Array>()
        .ok_or_else(|| perr(path, "token id lists must be list<uint32>"))?;
    Ok(v.values().to_vec())
}

/// Reads teacher data from every file of `spec`.
pub fn read_teacher(spec: &str) -> Result<Vec<TeacherRow>> {
    let mut out = Vec::new();
    for path in expand(spec)? {
        for b in batches(&path)? {
            let (id, prompt, response) = (
                string_col(&b, "id", &path)?,
                string_col(&b, "prompt", &path)?,
                string_col(&b, "response", &path)?,
            );
            let (pids, rids) = (
                ids_col(&b, "prompt_ids", &path)?,
                ids_col(&b, "response_ids", &path)?,
            );
            let fp = string_col(&b, "base_fingerprint", &path)?;
            for i in 0..b.num_rows() {
                out.push(TeacherRow {
                    id: id.value(i).to_string(),
                    prompt: prompt.value(i).to_string(),
                    response: response.value(i).to_string(),
                    prompt_ids: list_values(pids, i, &path)?,
                    response_ids: list_values(rids, i, &path)?,
                    base_fingerprint: fp.value(i).to_string(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A teacher file whose embedded Arrow schema holds a 96-bit integer (found by `just fuzz`:
    /// arrow-ipc panicked decoding it) is read from its parquet schema, or refused, never a panic.
    #[test]
    fn a_malformed_embedded_arrow_schema_is_no_panic() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for name in ["malformed_arrow_schema", "malformed_1", "malformed_2"] {
            let spec = dir.join(format!("{name}.parquet"));
            let spec = spec.to_str().unwrap();
            assert!(read_teacher(spec).is_err(), "{name}");
            assert!(read_prompts(spec, "prompt").is_err(), "{name}");
        }
    }

    /// The footer `just fuzz` found (a list declaring 32 GB of schema elements) is refused
    /// before the reader allocates; the files our writers make still read.
    #[test]
    fn a_footer_declaring_more_than_it_holds_is_refused() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let e = read_prompts(
            dir.join("malformed_oversized_list.parquet")
                .to_str()
                .unwrap(),
            "prompt",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("malformed footer"), "{e}");
        // The second one `just fuzz` found: a list of millions of one-byte structs, each read
        // into a struct of KB (25.7 GB asked for).
        let e = read_teacher(
            dir.join("malformed_many_small_structs.parquet")
                .to_str()
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("malformed footer"), "{e}");
        let tmp = std::env::temp_dir().join(format!("eesd-footer-{}.parquet", std::process::id()));
        write_prompts(&tmp, &[("a", "hello"), ("b", "world")]).unwrap();
        assert_eq!(
            read_prompts(tmp.to_str().unwrap(), "prompt").unwrap().len(),
            2
        );
        let _ = std::fs::remove_file(&tmp);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.parquet", "a.parquet"));
        assert!(glob_match("part-*.parquet", "part-00001.parquet"));
        assert!(!glob_match("part-*.parquet", "other.parquet"));
        assert!(!glob_match("*.parquet", "a.parquet.tmp"));
    }

    #[test]
    fn teacher_round_trip_and_missing_column() {
        let dir = std::env::temp_dir().join(format!("eesd-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = vec![TeacherRow {
            id: "a".into(),
            prompt: "p".into(),
            response: "r".into(),
            prompt_ids: vec![1, 2, 3],
            response_ids: vec![4, 5],
            base_fingerprint: "fp".into(),
        }];
        let f = dir.join("part-00000.parquet");
        write_teacher(&f, &rows).unwrap();
        assert_eq!(read_teacher(dir.to_str().unwrap()).unwrap(), rows);
        assert_eq!(
            read_prompts(f.to_str().unwrap(), "prompt").unwrap()[0].prompt,
            "p"
        );
        let err = read_prompts(f.to_str().unwrap(), "question")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column `question`"), "{err}");
        assert!(expand(dir.join("nothing-*.parquet").to_str().unwrap()).is_err());
    }
}
