//! The IDX format of the MNIST family (MNIST, Fashion-MNIST, KMNIST, EMNIST), raw or gzip.
//!
//! Layout (big-endian): a 4-byte magic `00 00 08 NDIM` (type code `08` = unsigned byte), NDIM
//! 4-byte dimension sizes, then the data. Image files are `0x00000803` with
//! `[count, rows, cols]`; label files are `0x00000801` with `[count]`.
//!
//! A file starting with the gzip magic `1f 8b` is decompressed on the fly (every member, as
//! `gunzip` does); otherwise it is read raw. Everything is validated and every problem is an
//! error naming the file, the byte offset (in the decompressed data for gzip files) and what
//! was expected, e.g. `train-images.gz: truncated at byte 47039944: expected 784 bytes of
//! image 59999 (bytes 47039232..47040016), file ends`. Trailing bytes after the declared
//! records are an error too. Memory grows only as data actually arrives, so a corrupt header
//! claiming billions of images cannot trigger a huge allocation.

use super::{DataError, Dataset};
use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The content of an IDX image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `count * rows * cols` grey values, row-major.
    pub pixels: Vec<u8>,
}

/// Opens `path` and returns a reader of its (decompressed if gzip) bytes, and whether it is gzip.
fn open(path: &Path) -> Result<(Box<dyn Read>, bool), DataError> {
    let mut f = BufReader::new(File::open(path).map_err(|e| DataError::io(path, e))?);
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DataError::io(path, e)),
        }
    }
    let head = std::io::Cursor::new(magic[..got].to_vec());
    if got == 2 && magic == [0x1f, 0x8b] {
        Ok((Box::new(MultiGzDecoder::new(head.chain(f))), true))
    } else {
        Ok((Box::new(head.chain(f)), false))
    }
}

/// A reader that tracks the offset, for error messages.
struct Src<'a> {
    r: Box<dyn Read + 'a>,
    name: String,
    pos: u64,
    gz: bool,
}

impl<'a> Src<'a> {
    fn new((r, gz): (Box<dyn Read + 'a>, bool), name: String) -> Self {
        Src { r, name, pos: 0, gz }
    }
}

impl<'a> Src<'a> {
    /// Reads up to `n` bytes; returns them (fewer only at end of data) or a read error.
    fn read_upto(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>, DataError> {
        let mut buf = Vec::new();
        let res = (&mut self.r).take(n).read_to_end(&mut buf);
        let start = self.pos;
        self.pos += buf.len() as u64;
        match res {
            Ok(_) => Ok(buf),
            Err(e) if self.gz => Err(DataError::Format(format!(
                "{}: gzip data corrupt or truncated after decompressed byte {} (reading {}, which starts at byte {start}): {e}",
                self.name,
                self.pos,
                what()
            ))),
            Err(e) => Err(DataError::Format(format!(
                "{}: read error at byte {} (reading {}, which starts at byte {start}): {e}",
                self.name,
                self.pos,
                what()
            ))),
        }
    }

    fn read_u32(&mut self, what: &str) -> Result<u32, DataError> {
        let start = self.pos;
        let b = self.read_upto(4, &|| what.to_string())?;
        if b.len() < 4 {
            return Err(DataError::Format(format!(
                "{}: truncated at byte {}: expected a 4-byte {what} at byte {start}, file ends",
                self.name, self.pos
            )));
        }
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn expect_end(&mut self, what: &str) -> Result<(), DataError> {
        let b = self.read_upto(1, &|| "past the last record".to_string())?;
        if !b.is_empty() {
            return Err(DataError::Format(format!(
                "{}: unexpected data at byte {}: expected the file to end after {what}",
                self.name,
                self.pos - 1
            )));
        }
        Ok(())
    }

    fn magic(&mut self, expected: u32, what: &str) -> Result<(), DataError> {
        let m = self.read_u32("magic number")?;
        if m != expected {
            let hint = match m {
                IMAGES_MAGIC => " (an IDX image file)",
                LABELS_MAGIC => " (an IDX label file)",
                0x1f8b_0000..=0x1f8b_ffff => " (gzip data inside gzip?)",
                _ => "",
            };
            return Err(DataError::Format(format!(
                "{}: bad magic number at byte 0: expected 0x{expected:08x} ({what}), found 0x{m:08x}{hint}",
                self.name
            )));
        }
        Ok(())
    }
}

fn parse_images(mut s: Src<'_>) -> Result<IdxImages, DataError> {
    s.magic(IMAGES_MAGIC, "IDX unsigned-byte 3-D images")?;
    let count = s.read_u32("image count")? as usize;
    let rows = s.read_u32("row count")? as usize;
    let cols = s.read_u32("column count")? as usize;
    if rows == 0 || cols == 0 {
        return Err(DataError::Format(format!(
            "{}: header at bytes 8..16 gives images of {rows}x{cols} pixels: expected both > 0",
            s.name
        )));
    }
    let per = rows * cols; // each < 2^32, fits u64 and usize on 64-bit
    let total = (count as u64).checked_mul(per as u64).ok_or_else(|| {
        DataError::Format(format!("{}: {count} images of {rows}x{cols} overflow", s.name))
    })?;
    let name = s.name.clone();
    let pixels = s.read_upto(total, &|| format!("{count} images of {rows}x{cols}"))?;
    if (pixels.len() as u64) < total {
        let image = pixels.len() / per;
        let start = 16 + image * per;
        return Err(DataError::Format(format!(
            "{name}: truncated at byte {}: expected {per} bytes of image {image} (bytes {start}..{}), file ends",
            s.pos,
            start + per
        )));
    }
    s.expect_end(&format!("{count} images of {rows}x{cols} (byte {})", 16 + total))?;
    Ok(IdxImages { count, rows, cols, pixels })
}

fn parse_labels(mut s: Src<'_>, num_classes: Option<usize>) -> Result<Vec<u8>, DataError> {
    s.magic(LABELS_MAGIC, "IDX unsigned-byte 1-D labels")?;
    let count = s.read_u32("label count")? as u64;
    let name = s.name.clone();
    let labels = s.read_upto(count, &|| format!("{count} labels"))?;
    if (labels.len() as u64) < count {
        return Err(DataError::Format(format!(
            "{name}: truncated at byte {}: expected 1 byte of label {}, file ends ({count} labels declared)",
            s.pos,
            labels.len()
        )));
    }
    s.expect_end(&format!("{count} labels (byte {})", 8 + count))?;
    if let Some(k) = num_classes {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            return Err(DataError::Format(format!(
                "{name}: label {l} at byte {} (label {i}) is out of range: expected 0..{k} for {k} classes",
                8 + i
            )));
        }
    }
    Ok(labels)
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Reads an IDX image file (raw or gzip).
pub fn read_idx_images(path: &Path) -> Result<IdxImages, DataError> {
    parse_images(Src::new(open(path)?, display(path)))
}

/// Reads an IDX label file (raw or gzip); with `num_classes`, every label must be below it.
pub fn read_idx_labels(path: &Path, num_classes: Option<usize>) -> Result<Vec<u8>, DataError> {
    parse_labels(Src::new(open(path)?, display(path)), num_classes)
}

fn bytes_reader<'a>(bytes: &'a [u8]) -> (Box<dyn Read + 'a>, bool) {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        (Box::new(MultiGzDecoder::new(bytes)), true)
    } else {
        (Box::new(bytes), false)
    }
}

/// Parses an IDX image file held in memory (raw or gzip); `name` is used in errors.
pub fn parse_idx_images(bytes: &[u8], name: &str) -> Result<IdxImages, DataError> {
    parse_images(Src::new(bytes_reader(bytes), name.to_string()))
}

/// Parses an IDX label file held in memory (raw or gzip); `name` is used in errors.
pub fn parse_idx_labels(bytes: &[u8], name: &str, num_classes: Option<usize>) -> Result<Vec<u8>, DataError> {
    parse_labels(Src::new(bytes_reader(bytes), name.to_string()), num_classes)
}

/// Encodes images as a raw IDX image file (`pixels.len()` must be a multiple of `rows * cols`).
pub fn encode_idx_images(rows: usize, cols: usize, pixels: &[u8]) -> Result<Vec<u8>, DataError> {
    let per = rows * cols;
    if per == 0 || !pixels.len().is_multiple_of(per) || rows > u32::MAX as usize || cols > u32::MAX as usize {
        return Err(DataError::Invalid(format!(
            "{} pixels are not a whole number of {rows}x{cols} images",
            pixels.len()
        )));
    }
    let count = u32::try_from(pixels.len() / per)
        .map_err(|_| DataError::Invalid("too many images for IDX".into()))?;
    let mut out = Vec::with_capacity(16 + pixels.len());
    for v in [IMAGES_MAGIC, count, rows as u32, cols as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    Ok(out)
}

/// Encodes labels as a raw IDX label file.
pub fn encode_idx_labels(labels: &[u8]) -> Result<Vec<u8>, DataError> {
    let count =
        u32::try_from(labels.len()).map_err(|_| DataError::Invalid("too many labels for IDX".into()))?;
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(labels);
    Ok(out)
}

/// Builds a dataset from an image file and a label file: 1-channel images with pixels
/// scaled to `[0, 1]` (`v / 255`), labels checked against `num_classes` and counted against
/// the images.
pub fn load_idx_pair(images: &Path, labels: &Path, num_classes: usize) -> Result<Dataset, DataError> {
    let img = read_idx_images(images)?;
    let lab = read_idx_labels(labels, Some(num_classes))?;
    if img.count != lab.len() {
        return Err(DataError::Format(format!(
            "{} has {} images but {} has {} labels: expected one label per image",
            images.display(),
            img.count,
            labels.display(),
            lab.len()
        )));
    }
    let pixels = img.pixels.iter().map(|&v| v as f32 / 255.0).collect();
    Dataset::new(
        pixels,
        lab.iter().map(|&l| l as usize).collect(),
        [1, img.rows, img.cols],
        num_classes,
    )
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    // Accept both the original MNIST names and the variant with a dot before idx.
    let stems = [stem.to_string(), stem.replacen("-idx", ".idx", 1)];
    for s in &stems {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{s}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::io(
        dir.join(format!("{stem}.gz")),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {stem} or {stem}.gz in {}", dir.display()),
        ),
    ))
}

/// Loads the standard MNIST-layout directory (`train-images-idx3-ubyte[.gz]`,
/// `train-labels-idx1-ubyte[.gz]`, `t10k-...` or `test-...`) as `(train, test)` with 10 classes.
pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    let train = load_idx_pair(
        &find(dir, "train-images-idx3-ubyte")?,
        &find(dir, "train-labels-idx1-ubyte")?,
        10,
    )?;
    let test_prefix = if find(dir, "t10k-images-idx3-ubyte").is_ok() { "t10k" } else { "test" };
    let test = load_idx_pair(
        &find(dir, &format!("{test_prefix}-images-idx3-ubyte"))?,
        &find(dir, &format!("{test_prefix}-labels-idx1-ubyte"))?,
        10,
    )?;
    Ok((train, test))
}
