//! An image-folder dataset, as torchvision's `ImageFolder`: `DIR/<class_name>/<file>.png|jpg`.
//!
//! Classes are the sub-directories of `DIR` sorted by name (label = position in that order);
//! files within a class are sorted by name too, so loading is deterministic. Files whose
//! extension is not `png`, `jpg` or `jpeg` (any case) and hidden entries (`.name`) are
//! skipped; a class directory with no image is an error (as in torchvision). Images are
//! decoded with the `image` crate to CHW `f32` in `[0, 1]` (8- and 16-bit depths; alpha
//! dropped).

use super::{DataError, Dataset};
use image::imageops::FilterType;
use image::DynamicImage;
use std::path::{Path, PathBuf};

/// How images are converted while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FolderOptions {
    /// Expected `(height, width)`. `None`: taken from the first image (in sorted order).
    pub size: Option<(usize, usize)>,
    /// Resize images of another size to `size` (bilinear) instead of reporting an error.
    pub resize: bool,
    /// Channels: 1 (grey) or 3 (RGB). `None`: 1 if the first image is greyscale, else 3.
    pub channels: Option<usize>,
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

fn is_image(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// The `(class names, files per class)` found under `dir`, both sorted.
pub fn scan_image_folder(dir: &Path) -> Result<(Vec<String>, Vec<Vec<PathBuf>>), DataError> {
    let mut names = Vec::new();
    let mut files = Vec::new();
    for p in list_dir(dir)? {
        if !p.is_dir() {
            continue;
        }
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| DataError::Invalid(format!("{}: class directory name is not UTF-8", p.display())))?
            .to_string();
        let imgs: Vec<PathBuf> = list_dir(&p)?.into_iter().filter(|f| is_image(f)).collect();
        if imgs.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: class directory '{name}' has no .png/.jpg/.jpeg image",
                p.display()
            )));
        }
        names.push(name);
        files.push(imgs);
    }
    if names.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no class sub-directories (expected DIR/<class>/<image>.png)",
            dir.display()
        )));
    }
    Ok((names, files))
}

fn decode(path: &Path) -> Result<DynamicImage, DataError> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    reader
        .decode()
        .map_err(|e| DataError::Format(format!("{}: cannot decode image: {e}", path.display())))
}

fn is_grey(img: &DynamicImage) -> bool {
    matches!(
        img,
        DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
    )
}

/// Appends `img` as CHW `f32` in `[0, 1]` with `channels` channels.
fn push_chw(out: &mut Vec<f32>, img: &DynamicImage, channels: usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if channels == 1 {
        let g = img.to_luma32f();
        out.extend(g.as_raw().iter().map(|v| v.clamp(0.0, 1.0)));
    } else {
        let rgb = img.to_rgb32f();
        let raw = rgb.as_raw();
        for c in 0..3 {
            out.extend((0..h * w).map(|i| raw[i * 3 + c].clamp(0.0, 1.0)));
        }
    }
}

/// Decodes one image file to CHW `f32` in `[0, 1]` (as the folder loader does) with
/// `channels` channels (1 or 3; `None`: 1 for a greyscale file, else 3); returns the values
/// and their `[channels, height, width]`. No resizing: callers check the size.
pub fn load_image(path: &Path, channels: Option<usize>) -> Result<(Vec<f32>, [usize; 3]), DataError> {
    let img = decode(path)?;
    let c = channels.unwrap_or(if is_grey(&img) { 1 } else { 3 });
    if c != 1 && c != 3 {
        return Err(DataError::Invalid(format!("{}: images can be read with 1 or 3 channels, not {c}", path.display())));
    }
    let mut out = Vec::with_capacity(c * img.width() as usize * img.height() as usize);
    push_chw(&mut out, &img, c);
    Ok((out, [c, img.height() as usize, img.width() as usize]))
}

/// Loads `dir` as a dataset (see the module docs). An image whose size differs from the
/// expected one is an error naming the file and both sizes, unless `opts.resize`.
pub fn load_image_folder(dir: &Path, opts: FolderOptions) -> Result<Dataset, DataError> {
    if let Some(c) = opts.channels {
        if c != 1 && c != 3 {
            return Err(DataError::Invalid(format!("image folder channels must be 1 or 3, got {c}")));
        }
    }
    if let Some((h, w)) = opts.size {
        if h == 0 || w == 0 || h > u32::MAX as usize || w > u32::MAX as usize {
            return Err(DataError::Invalid(format!("image folder size {h}x{w} is invalid")));
        }
    }
    let (names, files) = scan_image_folder(dir)?;
    let mut size = opts.size;
    let mut channels = opts.channels;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (label, class_files) in files.iter().enumerate() {
        for path in class_files {
            let mut img = decode(path)?;
            let (h, w) = (img.height() as usize, img.width() as usize);
            let (eh, ew) = *size.get_or_insert((h, w));
            let c = *channels.get_or_insert(if is_grey(&img) { 1 } else { 3 });
            if (h, w) != (eh, ew) {
                if !opts.resize {
                    return Err(DataError::Format(format!(
                        "{}: image is {h}x{w} (height x width) but {eh}x{ew} is expected \
                         (set the resize option to resize it)",
                        path.display()
                    )));
                }
                img = img.resize_exact(ew as u32, eh as u32, FilterType::Triangle);
            }
            push_chw(&mut images, &img, c);
            labels.push(label);
        }
    }
    let (h, w) = size.unwrap_or((1, 1));
    Dataset::new(images, labels, [channels.unwrap_or(1), h, w], names.len())?.with_class_names(names)
}
