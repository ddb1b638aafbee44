//! Image and array files: RGB8 images from/to model tensors, PNG (with generation metadata),
//! JPEG and lossless WebP files chosen by extension, and float32 `.npy` arrays. Every file is
//! written to a temporary file in the target folder and renamed into place, so an existing
//! file is never left half-written; the file gets the permissions the process's umask gives
//! a new file, as `File::create` would.

use std::io::{BufWriter, Write};
use std::path::Path;

use diffusion_core::{Error, Result};
use npyz::WriterBuilder;

/// JPEG quality used when none is asked for (the `diffusion` command's `--jpeg-quality`
/// default): visually lossless for generated images at about a fifth of the PNG's size.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// The file extensions [`ImageFormat::from_path`] accepts (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// An image file format [`RgbImage::save`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG, lossless, with the metadata as text chunks.
    Png,
    /// Baseline JPEG; the metadata is not stored.
    Jpeg {
        /// Encoder quality in `1..=100` (higher: larger and closer to the original).
        quality: u8,
    },
    /// Lossless WebP (VP8L; the `image` crate has no lossy WebP encoder); the metadata is
    /// not stored. Sides are limited to 16384 pixels by the format.
    WebP,
}

impl ImageFormat {
    /// The format named by `path`'s extension (`.png`, `.jpg` / `.jpeg`, `.webp`, any case);
    /// JPEG at [`DEFAULT_JPEG_QUALITY`]. Any other extension, or none, is
    /// [`Error::InvalidArgument`] naming the supported ones.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(ImageFormat::Png),
            Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg {
                quality: DEFAULT_JPEG_QUALITY,
            }),
            Some("webp") => Ok(ImageFormat::WebP),
            _ => Err(Error::InvalidArgument(format!(
                "{}: unsupported image format {}; supported extensions: {}",
                path.display(),
                match path.extension() {
                    Some(e) => format!("`.{}`", e.to_string_lossy()),
                    None => "(no extension)".to_string(),
                },
                IMAGE_EXTENSIONS
                    .iter()
                    .map(|e| format!(".{e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// This format with JPEG quality `quality` (other formats are returned unchanged).
    /// `quality` is checked whatever the format, so a bad value is reported even before the
    /// output's extension is settled: outside `1..=100` it is [`Error::InvalidArgument`].
    pub fn with_jpeg_quality(self, quality: u32) -> Result<Self> {
        let quality = check_jpeg_quality(quality)?;
        Ok(match self {
            ImageFormat::Jpeg { .. } => ImageFormat::Jpeg { quality },
            other => other,
        })
    }
}

fn check_jpeg_quality(quality: u32) -> Result<u8> {
    match u8::try_from(quality) {
        Ok(q @ 1..=100) => Ok(q),
        _ => Err(Error::InvalidArgument(format!(
            "JPEG quality must be in 1..=100, got {quality}"
        ))),
    }
}

/// Checks, before any work, that an output file can be written at `path`: its folder (the
/// current one for a bare file name) exists, is a folder and accepts a new file (tried by
/// creating and removing a temporary file there, which also covers read-only mounts and
/// ACLs), and `path` itself is not a folder. Failures are [`Error::InvalidArgument`]. The
/// extension is not looked at: see [`ImageFormat::from_path`].
pub fn check_output_path(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    let bad = |why: String| Err(Error::InvalidArgument(format!("{}: {why}", path.display())));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return bad(format!("{} is not a folder", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad(format!("the folder {} does not exist", dir.display()));
        }
        Err(e) => return bad(format!("cannot reach the folder {}: {e}", dir.display())),
    }
    if path.is_dir() {
        return bad("is a folder, not a file".into());
    }
    if let Err(e) = tempfile::Builder::new()
        .prefix(".diffusion-write-check")
        .tempfile_in(dir)
    {
        return bad(format!("cannot write in the folder {}: {e}", dir.display()));
    }
    Ok(())
}

/// The folder a file at `path` goes in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// An 8-bit RGB image, row-major, `height * width * 3` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Interleaved RGB bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// Converts one image of a `[3, H, W]` float array in `[0, 1]` (channel-major) to RGB8,
    /// rounding as diffusers' `numpy_to_pil` does (`(x * 255).round()`).
    pub fn from_chw_unit(data: &[f32], height: usize, width: usize) -> Result<Self> {
        if data.len() != 3 * height * width {
            return Err(Error::Shape(format!(
                "{} values for a 3x{height}x{width} image",
                data.len()
            )));
        }
        let plane = height * width;
        let mut pixels = Vec::with_capacity(3 * plane);
        for i in 0..plane {
            for c in 0..3 {
                pixels.push(unit_to_u8(data[c * plane + i]));
            }
        }
        Ok(Self {
            width: width as u32,
            height: height as u32,
            pixels,
        })
    }

    /// The image as a `[3, H, W]` float array in `[0, 1]`.
    pub fn to_chw_unit(&self) -> Vec<f32> {
        let plane = (self.width * self.height) as usize;
        let mut out = vec![0.0; 3 * plane];
        for i in 0..plane {
            for c in 0..3 {
                out[c * plane + i] = self.pixels[3 * i + c] as f32 / 255.0;
            }
        }
        out
    }

    /// Reads a PNG, JPEG or WebP file (any colour type; converted to RGB8).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let img = image::open(path).map_err(|e| match e {
            image::ImageError::IoError(io) => Error::io(path, io),
            other => Error::InvalidArgument(format!("{}: {other}", path.display())),
        })?;
        let rgb = img.to_rgb8();
        Ok(Self {
            width: rgb.width(),
            height: rgb.height(),
            pixels: rgb.into_raw(),
        })
    }

    /// Writes the image in the format `path`'s extension names ([`ImageFormat::from_path`];
    /// JPEG at [`DEFAULT_JPEG_QUALITY`]), atomically; `metadata` is stored by PNG only.
    pub fn save(&self, path: impl AsRef<Path>, metadata: &[(String, String)]) -> Result<()> {
        let path = path.as_ref();
        self.save_as(path, ImageFormat::from_path(path)?, metadata)
    }

    /// Writes the image as `format` whatever `path`'s extension, atomically; `metadata`
    /// (key, value) becomes PNG text chunks and is not stored by the other formats.
    pub fn save_as(
        &self,
        path: impl AsRef<Path>,
        format: ImageFormat,
        metadata: &[(String, String)],
    ) -> Result<()> {
        let path = path.as_ref();
        // The encoders panic on a buffer of the wrong length: check it here instead.
        let expected = 3 * self.width as usize * self.height as usize;
        if self.pixels.len() != expected {
            return Err(Error::Shape(format!(
                "{} bytes for a {}x{} RGB image ({expected} expected)",
                self.pixels.len(),
                self.width,
                self.height
            )));
        }
        let encode_err = |e: image::ImageError| std::io::Error::other(e.to_string());
        match format {
            ImageFormat::Png => self.save_png(path, metadata),
            ImageFormat::Jpeg { quality } => {
                let quality = check_jpeg_quality(quality.into())?;
                write_atomically(path, |w| {
                    image::codecs::jpeg::JpegEncoder::new_with_quality(w, quality)
                        .encode(
                            &self.pixels,
                            self.width,
                            self.height,
                            image::ExtendedColorType::Rgb8,
                        )
                        .map_err(encode_err)
                })
            }
            ImageFormat::WebP => {
                if self.width > 16_384 || self.height > 16_384 {
                    return Err(Error::InvalidArgument(format!(
                        "{}: WebP images are at most 16384 pixels a side, this one is {}x{}",
                        path.display(),
                        self.width,
                        self.height
                    )));
                }
                write_atomically(path, |w| {
                    image::codecs::webp::WebPEncoder::new_lossless(w)
                        .encode(
                            &self.pixels,
                            self.width,
                            self.height,
                            image::ExtendedColorType::Rgb8,
                        )
                        .map_err(encode_err)
                })
            }
        }
    }

    /// Writes a PNG with `metadata` as text chunks (key, value), atomically.
    pub fn save_png(&self, path: impl AsRef<Path>, metadata: &[(String, String)]) -> Result<()> {
        let path = path.as_ref();
        write_atomically(path, |w| {
            let mut encoder = png::Encoder::new(w, self.width, self.height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            for (k, v) in metadata {
                encoder
                    .add_itxt_chunk(k.clone(), v.clone())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            let mut writer = encoder
                .write_header()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writer
                .write_image_data(&self.pixels)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writer
                .finish()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(())
        })
    }
}

/// Reads the text chunks (`tEXt`, `zTXt`, `iTXt`) of a PNG file.
pub fn read_png_text(path: impl AsRef<Path>) -> Result<Vec<(String, String)>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        if let Ok(text) = c.get_text() {
            out.push((c.keyword.clone(), text));
        }
    }
    Ok(out)
}

fn unit_to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Writes `path` through a temporary file in the same folder, renamed into place only when
/// `write` succeeded; on failure the previous file (if any) is untouched. The file ends up
/// with the permissions a plain `File::create` would give it (`0o666` less the umask).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    // tempfile creates its files 0600 (private scratch files); an output image or array is
    // not scratch, so it is created with 0666 and the kernel applies the umask, as for any
    // new file. Done at creation, so there is no window with other permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        write(&mut w).map_err(|e| Error::io(path, e))?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// A float32 array read from or written to a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// The array's shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl NpyArray {
    /// Reads a C-order float32 (or float64, converted) `.npy` file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |m: String| {
            Error::InvalidArgument(format!("{}: not a usable .npy file: {m}", path.display()))
        };
        let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| bad(e.to_string()))?;
        if npy.order() != npyz::Order::C {
            return Err(bad("Fortran-order arrays are not supported".into()));
        }
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        let dtype = npy.dtype();
        let data: Vec<f32> = match &dtype {
            npyz::DType::Plain(t)
                if t.type_char() == npyz::TypeChar::Float && t.size_field() == 4 =>
            {
                npy.into_vec::<f32>().map_err(|e| bad(e.to_string()))?
            }
            npyz::DType::Plain(t)
                if t.type_char() == npyz::TypeChar::Float && t.size_field() == 8 =>
            {
                npy.into_vec::<f64>()
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|v| v as f32)
                    .collect()
            }
            other => {
                return Err(bad(format!(
                    "dtype {} is not float32/float64",
                    other.descr()
                )));
            }
        };
        if data.len() != shape.iter().product::<usize>() {
            return Err(bad("data length does not match the header's shape".into()));
        }
        Ok(Self { shape, data })
    }

    /// Writes a C-order float32 `.npy` file, atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if self.data.len() != self.shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "{} values for shape {:?}",
                self.data.len(),
                self.shape
            )));
        }
        write_atomically(path, |w| {
            let shape: Vec<u64> = self.shape.iter().map(|&d| d as u64).collect();
            let mut writer = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&shape)
                .writer(w)
                .begin_nd()?;
            writer.extend(self.data.iter().copied())?;
            writer.finish()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_roundtrip_keeps_pixels_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let data: Vec<f32> = (0..3 * 4 * 5).map(|i| (i as f32) / 60.0).collect();
        let img = RgbImage::from_chw_unit(&data, 4, 5).unwrap();
        let meta = vec![("prompt".to_string(), "a red circle ✓".to_string())];
        img.save_png(&path, &meta).unwrap();
        let back = RgbImage::open(&path).unwrap();
        assert_eq!(back, img);
        assert_eq!(read_png_text(&path).unwrap(), meta);
        let again = back.to_chw_unit();
        for (a, b) in again.iter().zip(&data) {
            assert!((a - b).abs() <= 0.5 / 255.0 + 1e-6);
        }
    }

    #[test]
    fn npy_roundtrip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let a = NpyArray {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5],
        };
        a.write(&path).unwrap();
        assert_eq!(NpyArray::read(&path).unwrap(), a);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            NpyArray::read(&path),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            NpyArray::read(dir.path().join("missing.npy")),
            Err(Error::Io { .. })
        ));
        let bad = NpyArray {
            shape: vec![4],
            data: vec![1.0],
        };
        assert!(bad.write(&path).is_err());
    }

    #[test]
    fn wrong_sized_image_data_is_an_error() {
        assert!(RgbImage::from_chw_unit(&[0.0; 5], 1, 2).is_err());
        // The encoders would panic on it; save answers a typed error instead.
        let dir = tempfile::tempdir().unwrap();
        let short = RgbImage {
            width: 4,
            height: 4,
            pixels: vec![0; 5],
        };
        for name in ["a.png", "a.jpg", "a.webp"] {
            let path = dir.path().join(name);
            assert!(
                matches!(short.save(&path, &[]), Err(Error::Shape(_))),
                "{name}"
            );
            assert!(!path.exists());
        }
    }

    /// A smooth test picture (JPEG is lossy; smooth content keeps its error small).
    fn gradient(width: u32, height: u32) -> RgbImage {
        let mut pixels = Vec::new();
        for y in 0..height {
            for x in 0..width {
                pixels.extend([(x * 8) as u8, (y * 8) as u8, 128]);
            }
        }
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn formats_follow_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        let img = gradient(24, 16);
        let meta = vec![("prompt".to_string(), "x".to_string())];
        for (name, magic) in [
            ("a.png", &b"\x89PNG"[..]),
            ("b.PNG", &b"\x89PNG"[..]),
            ("c.jpg", &b"\xff\xd8\xff"[..]),
            ("d.jpeg", &b"\xff\xd8\xff"[..]),
            ("e.webp", &b"RIFF"[..]),
        ] {
            let path = dir.path().join(name);
            img.save(&path, &meta).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.starts_with(magic), "{name}");
            let back = RgbImage::open(&path).unwrap();
            assert_eq!((back.width, back.height), (24, 16), "{name}");
            let max_err = back
                .pixels
                .iter()
                .zip(&img.pixels)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            // PNG and WebP are lossless; JPEG at quality 90 stays close on a gradient.
            let bound = if name.contains("jp") { 12 } else { 0 };
            assert!(max_err <= bound, "{name}: max error {max_err}");
        }
        assert_eq!(read_png_text(dir.path().join("a.png")).unwrap(), meta);
    }

    #[test]
    fn jpeg_quality_is_used_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let img = gradient(32, 32);
        let (low, high) = (dir.path().join("low.jpg"), dir.path().join("high.jpg"));
        let fmt = ImageFormat::from_path(&low).unwrap();
        assert_eq!(
            fmt,
            ImageFormat::Jpeg {
                quality: DEFAULT_JPEG_QUALITY
            }
        );
        img.save_as(&low, fmt.with_jpeg_quality(5).unwrap(), &[])
            .unwrap();
        img.save_as(&high, fmt.with_jpeg_quality(100).unwrap(), &[])
            .unwrap();
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&low) < size(&high), "{} {}", size(&low), size(&high));
        for bad in [0, 101, 300] {
            let e = ImageFormat::Png.with_jpeg_quality(bad).unwrap_err();
            assert!(e.to_string().contains("1..=100"), "{e}");
        }
        let e = img
            .save_as(&low, ImageFormat::Jpeg { quality: 0 }, &[])
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn unknown_extensions_name_the_supported_ones() {
        for name in ["out.gif", "out", "out.png.bak", "out.tiff"] {
            let e = ImageFormat::from_path(Path::new(name)).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::InvalidArgument(_)), "{msg}");
            assert!(
                msg.contains(".png, .jpg, .jpeg, .webp") && msg.contains(name),
                "{msg}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gif");
        assert!(gradient(8, 8).save(&path, &[]).is_err());
        assert!(!path.exists());
    }

    #[cfg(unix)]
    #[test]
    fn written_files_get_the_umask_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // What File::create gives a new file here: the reference, whatever the umask.
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let want = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        let img = gradient(8, 8);
        for name in ["a.png", "a.jpg", "a.webp"] {
            let path = dir.path().join(name);
            img.save(&path, &[]).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{name}: {mode:o} vs {want:o}");
        }
        let npy = dir.path().join("a.npy");
        NpyArray {
            shape: vec![1],
            data: vec![1.0],
        }
        .write(&npy)
        .unwrap();
        let mode = std::fs::metadata(&npy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, want);
    }

    #[test]
    fn output_paths_are_checked_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        check_output_path(&dir.path().join("ok.png")).unwrap();
        // A bare file name is in the current folder (which the test runner can write).
        check_output_path(Path::new("ok.png")).unwrap();
        let missing = dir.path().join("no/such/folder/x.png");
        let e = check_output_path(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = check_output_path(&file.join("x.png"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a folder"), "{e}");
        let e = check_output_path(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        // No probe file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file")]);
    }

    #[cfg(unix)]
    #[test]
    fn read_only_folders_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root (and CAP_DAC_OVERRIDE) writes anywhere: then there is nothing to refuse.
        let writable = std::fs::File::create(ro.join("probe")).is_ok();
        let result = check_output_path(&ro.join("x.png"));
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        if writable {
            eprintln!("skipped: this user can write in a 0555 folder");
            return;
        }
        let e = result.unwrap_err().to_string();
        assert!(e.contains("cannot write in the folder"), "{e}");
    }
}
