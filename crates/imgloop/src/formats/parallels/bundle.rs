//! Parallels Desktop disk bundles: a directory `NAME.hdd/` holding
//! `DiskDescriptor.xml` and the image files of a disk and its snapshots.
//!
//! The descriptor lists the images (GUID, `Plain` = raw or `Compressed` =
//! a Parallels image, file name), the snapshot tree (each shot's parent
//! GUID; the root's is all zeroes) and optionally the top GUID (the
//! image written to). An image of the bundle reads through its parent
//! image: that is how a Parallels image gets a backing file. File names
//! must stay inside the bundle directory.

use crate::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The descriptor's file name.
pub const DESCRIPTOR: &str = "DiskDescriptor.xml";
/// The top image's GUID when the descriptor names none.
pub const DEFAULT_TOP: &str = "{5fbaabe3-6958-40ff-92a7-860e329aab41}";
/// The root snapshot's parent.
const NO_PARENT: &str = "{00000000-0000-0000-0000-000000000000}";
/// A descriptor larger than this is refused (they are a few KiB).
const MAX_DESCRIPTOR: u64 = 4 << 20;

/// One image of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleImage {
    /// Its GUID, as written (braces included), lowercased.
    pub guid: String,
    /// `Compressed` (a Parallels image) rather than `Plain` (raw).
    pub expandable: bool,
    /// Its file name, relative to the bundle directory.
    pub file: PathBuf,
}

/// A parsed `DiskDescriptor.xml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// Its images.
    pub images: Vec<BundleImage>,
    /// Snapshot GUID → parent GUID (absent for the root).
    pub parents: BTreeMap<String, String>,
    /// The GUID of the image written to.
    pub top: String,
    /// Sectors per cluster of the expandable images (`Blocksize`).
    pub block_size: Option<u64>,
    /// The disk's size in sectors (`Disk_size`).
    pub disk_sectors: u64,
}

fn bad(dir: &Path, msg: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::InvalidFormat, msg)
        .at("Parallels DiskDescriptor.xml", 0)
        .in_file(dir.join(DESCRIPTOR))
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn text_of(node: roxmltree::Node, name: &str) -> Option<String> {
    child(node, name)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}

impl Bundle {
    /// Whether `dir` is a bundle (holds a descriptor).
    pub fn is_bundle(dir: &Path) -> bool {
        dir.join(DESCRIPTOR).is_file()
    }

    /// Reads the descriptor of the bundle `dir`.
    pub fn read(dir: &Path) -> Result<Bundle> {
        let path = dir.join(DESCRIPTOR);
        let meta = std::fs::metadata(&path)
            .map_err(|e| Error::io("could not open the bundle descriptor", e).in_file(&path))?;
        if meta.len() > MAX_DESCRIPTOR {
            return Err(bad(
                dir,
                format!(
                    "the descriptor is {} bytes (at most {MAX_DESCRIPTOR})",
                    meta.len()
                ),
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("could not read the bundle descriptor", e).in_file(&path))?;
        Bundle::parse(dir, &text)
    }

    /// Parses descriptor text of the bundle `dir`.
    pub fn parse(dir: &Path, text: &str) -> Result<Bundle> {
        let doc = roxmltree::Document::parse(text)
            .map_err(|e| bad(dir, format!("not valid XML: {e}")))?;
        let root = doc.root_element();
        if !root.has_tag_name("Parallels_disk_image") {
            return Err(bad(
                dir,
                format!(
                    "the root element is <{}>, not <Parallels_disk_image>",
                    root.tag_name().name()
                ),
            ));
        }
        let disk_sectors = child(root, "Disk_Parameters")
            .and_then(|p| text_of(p, "Disk_size"))
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| bad(dir, "no valid <Disk_Parameters><Disk_size>"))?;
        let data = child(root, "StorageData").ok_or_else(|| bad(dir, "no <StorageData>"))?;
        let storages: Vec<_> = data
            .children()
            .filter(|c| c.has_tag_name("Storage"))
            .collect();
        let storage = match storages.as_slice() {
            [one] => *one,
            [] => return Err(bad(dir, "no <Storage> in <StorageData>")),
            _ => {
                return Err(Error::unsupported(format!(
                    "split images ({} <Storage> elements) are not supported",
                    storages.len()
                ))
                .at("Parallels DiskDescriptor.xml", 0)
                .in_file(dir.join(DESCRIPTOR)))
            }
        };
        let block_size = text_of(storage, "Blocksize").and_then(|t| t.parse::<u64>().ok());
        let mut images = Vec::new();
        for img in storage.children().filter(|c| c.has_tag_name("Image")) {
            let guid = text_of(img, "GUID")
                .ok_or_else(|| bad(dir, "an <Image> without <GUID>"))?
                .to_lowercase();
            let expandable = match text_of(img, "Type").as_deref() {
                Some("Compressed") => true,
                Some("Plain") => false,
                other => {
                    return Err(bad(
                        dir,
                        format!("image {guid} has the type {other:?} (Plain or Compressed)"),
                    ))
                }
            };
            let file = text_of(img, "File")
                .ok_or_else(|| bad(dir, format!("image {guid} has no <File>")))?;
            let file = PathBuf::from(&file);
            let inside = !file.as_os_str().is_empty()
                && file.components().all(|c| matches!(c, Component::Normal(_)));
            if !inside {
                return Err(bad(
                    dir,
                    format!(
                        "image {guid} names the file '{}', outside the bundle directory",
                        file.display()
                    ),
                ));
            }
            if images.iter().any(|i: &BundleImage| i.guid == guid) {
                return Err(bad(dir, format!("image {guid} is listed twice")));
            }
            images.push(BundleImage {
                guid,
                expandable,
                file,
            });
        }
        if images.is_empty() {
            return Err(bad(dir, "the descriptor lists no <Image>"));
        }
        let mut parents = BTreeMap::new();
        let mut top = None;
        if let Some(shots) = child(root, "Snapshots") {
            top = text_of(shots, "TopGUID").map(|t| t.to_lowercase());
            for shot in shots.children().filter(|c| c.has_tag_name("Shot")) {
                let guid = text_of(shot, "GUID")
                    .ok_or_else(|| bad(dir, "a <Shot> without <GUID>"))?
                    .to_lowercase();
                let parent = text_of(shot, "ParentGUID")
                    .ok_or_else(|| bad(dir, format!("snapshot {guid} has no <ParentGUID>")))?
                    .to_lowercase();
                if parent != NO_PARENT {
                    parents.insert(guid, parent);
                }
            }
        }
        let top = top.unwrap_or_else(|| DEFAULT_TOP.to_string());
        let b = Bundle {
            dir: dir.to_path_buf(),
            images,
            parents,
            top,
            block_size,
            disk_sectors,
        };
        if b.image(&b.top).is_none() {
            return Err(bad(dir, format!("the top image {} is not listed", b.top)));
        }
        // Every chain ends at a listed root, without loops.
        for img in &b.images {
            let mut g = img.guid.clone();
            for _ in 0..=b.images.len() {
                match b.parents.get(&g) {
                    None => break,
                    Some(p) if b.image(p).is_none() => {
                        return Err(bad(
                            dir,
                            format!("snapshot {g} has the parent {p}, which is not listed"),
                        ))
                    }
                    Some(p) => g = p.clone(),
                }
            }
            if b.parents.contains_key(&g) {
                return Err(bad(
                    dir,
                    format!("the snapshot tree has a loop through {}", img.guid),
                ));
            }
        }
        Ok(b)
    }

    /// The image with `guid`.
    pub fn image(&self, guid: &str) -> Option<&BundleImage> {
        self.images.iter().find(|i| i.guid == guid)
    }

    /// The top image's file, inside the bundle directory.
    pub fn top_file(&self) -> PathBuf {
        let top = self.image(&self.top).expect("checked by parse");
        self.dir.join(&top.file)
    }

    /// The image of the bundle stored in `file` (a path inside the
    /// bundle directory).
    pub fn image_for(&self, file: &Path) -> Option<&BundleImage> {
        let name = file.file_name()?;
        self.images.iter().find(|i| {
            self.dir.join(&i.file) == file
                || (i.file.components().count() == 1 && i.file.as_os_str() == name)
        })
    }

    /// The parent image of `image`, if it has one.
    pub fn parent(&self, image: &BundleImage) -> Option<&BundleImage> {
        self.parents.get(&image.guid).and_then(|p| self.image(p))
    }
}

/// Adds the new image `file` as a snapshot over `parent` (both in the
/// bundle directory `dir`) and makes it the top image: the descriptor is
/// created when there is none, else the image, its shot and the top GUID
/// are written into it (everything else in it is kept as it is). The new
/// descriptor replaces the old one atomically.
pub fn add_snapshot(
    dir: &Path,
    parent: &Path,
    parent_expandable: bool,
    file: &Path,
    disk_sectors: u64,
    tracks: u64,
) -> Result<()> {
    // Both files must be in the bundle directory.
    let canonical_dir = |p: &Path| {
        let d = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::canonicalize(d).ok()
    };
    let here = std::fs::canonicalize(dir).ok();
    let name = |p: &Path| -> Result<String> {
        match (p.file_name(), canonical_dir(p)) {
            (Some(n), Some(d)) if Some(&d) == here.as_ref() => Ok(n.to_string_lossy().into_owned()),
            _ => Err(Error::invalid_argument(format!(
                "'{}' is not in the directory '{}': a Parallels image gets its backing file through a disk bundle, which keeps both in one directory",
                p.display(),
                dir.display()
            ))),
        }
    };
    let (parent_name, file_name) = (name(parent)?, name(file)?);
    let guid = format!("{{{}}}", uuid::Uuid::new_v4());
    let image = format!(
        "<Image><GUID>{guid}</GUID><Type>Compressed</Type><File>{}</File></Image>",
        xml_text(&file_name)
    );
    let path = dir.join(DESCRIPTOR);
    let text = if Bundle::is_bundle(dir) {
        let old = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("could not read the bundle descriptor", e).in_file(&path))?;
        let b = Bundle::parse(dir, &old)?;
        let p = b
            .images
            .iter()
            .find(|i| i.file == Path::new(&parent_name))
            .ok_or_else(|| {
                bad(
                    dir,
                    format!("the descriptor does not list the backing file '{parent_name}'"),
                )
            })?;
        if b.images.iter().any(|i| i.file == Path::new(&file_name)) {
            return Err(bad(
                dir,
                format!("the descriptor already lists '{file_name}'"),
            ));
        }
        let shot = format!(
            "<Shot><GUID>{guid}</GUID><ParentGUID>{}</ParentGUID></Shot>",
            p.guid
        );
        let mut t = insert_before_last(&old, "</Storage>", &image)
            .ok_or_else(|| bad(dir, "no </Storage> to add the image to"))?;
        t = match insert_before_last(&t, "</Snapshots>", &shot) {
            Some(t) => t,
            None => {
                let shots = format!(
                    "<Snapshots><Shot><GUID>{}</GUID><ParentGUID>{NO_PARENT}</ParentGUID></Shot>{shot}</Snapshots>",
                    p.guid
                );
                insert_before_last(&t, "</Parallels_disk_image>", &shots)
                    .ok_or_else(|| bad(dir, "no </Parallels_disk_image>"))?
            }
        };
        set_top(&t, &guid).ok_or_else(|| bad(dir, "no <Snapshots> for the top GUID"))?
    } else {
        let root = format!("{{{}}}", uuid::Uuid::new_v4());
        let kind = if parent_expandable {
            "Compressed"
        } else {
            "Plain"
        };
        format!(
            "<?xml version='1.0' encoding='UTF-8'?>\n\
<Parallels_disk_image Version=\"1.0\">\n\
  <Disk_Parameters>\n    <Disk_size>{disk_sectors}</Disk_size>\n    <Cylinders>{}</Cylinders>\n    <Heads>16</Heads>\n    <Sectors>32</Sectors>\n    <Padding>0</Padding>\n  </Disk_Parameters>\n\
  <StorageData>\n    <Storage>\n      <Start>0</Start>\n      <End>{disk_sectors}</End>\n      <Blocksize>{tracks}</Blocksize>\n\
      <Image><GUID>{root}</GUID><Type>{kind}</Type><File>{}</File></Image>\n      {image}\n    </Storage>\n  </StorageData>\n\
  <Snapshots>\n    <TopGUID>{guid}</TopGUID>\n\
    <Shot><GUID>{root}</GUID><ParentGUID>{NO_PARENT}</ParentGUID></Shot>\n\
    <Shot><GUID>{guid}</GUID><ParentGUID>{root}</ParentGUID></Shot>\n  </Snapshots>\n\
</Parallels_disk_image>\n",
            disk_sectors / 512,
            xml_text(&parent_name)
        )
    };
    // What was written must read back as this bundle.
    let b = Bundle::parse(dir, &text)?;
    debug_assert_eq!(b.top, guid);
    let tmp = dir.join(".DiskDescriptor.xml.new");
    std::fs::write(&tmp, &text)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io("writing the bundle descriptor", e).in_file(&path))
}

fn xml_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn insert_before_last(text: &str, tag: &str, what: &str) -> Option<String> {
    let at = text.rfind(tag)?;
    Some(format!("{}{what}\n{}", &text[..at], &text[at..]))
}

/// `text` with the top GUID set to `guid` (replaced, or added first in
/// `<Snapshots>`).
fn set_top(text: &str, guid: &str) -> Option<String> {
    if let (Some(a), Some(b)) = (text.find("<TopGUID>"), text.find("</TopGUID>")) {
        if a < b {
            return Some(format!("{}<TopGUID>{guid}{}", &text[..a], &text[b..]));
        }
    }
    let at = text.find("<Snapshots>")? + "<Snapshots>".len();
    Some(format!(
        "{}<TopGUID>{guid}</TopGUID>{}",
        &text[..at],
        &text[at..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
  <Disk_Parameters><Disk_size>32768</Disk_size><Cylinders>32</Cylinders><Heads>16</Heads><Sectors>64</Sectors><Padding>0</Padding></Disk_Parameters>
  <StorageData><Storage><Start>0</Start><End>32768</End><Blocksize>2048</Blocksize>
    <Image><GUID>{AAAAAAAA-0000-0000-0000-000000000001}</GUID><Type>Compressed</Type><File>base.hds</File></Image>
    <Image><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><Type>Compressed</Type><File>top.hds</File></Image>
  </Storage></StorageData>
  <Snapshots>
    <Shot><GUID>{aaaaaaaa-0000-0000-0000-000000000001}</GUID><ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID></Shot>
    <Shot><GUID>{5fbaabe3-6958-40ff-92a7-860e329aab41}</GUID><ParentGUID>{aaaaaaaa-0000-0000-0000-000000000001}</ParentGUID></Shot>
  </Snapshots>
</Parallels_disk_image>"#;

    #[test]
    fn a_descriptor_gives_the_top_image_and_its_chain() {
        let b = Bundle::parse(Path::new("/d.hdd"), TWO).unwrap();
        assert_eq!(b.top_file(), Path::new("/d.hdd/top.hds"));
        let top = b.image_for(Path::new("/d.hdd/top.hds")).unwrap();
        let base = b.parent(top).unwrap();
        assert_eq!(base.file, Path::new("base.hds"));
        assert!(b.parent(base).is_none());
        assert_eq!((b.block_size, b.disk_sectors), (Some(2048), 32768));
    }

    #[test]
    fn hostile_descriptors_are_refused() {
        let cases = [
            (
                TWO.replace("base.hds", "../etc/passwd"),
                "outside the bundle",
            ),
            (TWO.replace("base.hds", "/etc/passwd"), "outside the bundle"),
            (
                TWO.replace(
                    "<Type>Compressed</Type><File>top",
                    "<Type>Weird</Type><File>top",
                ),
                "type",
            ),
            (
                TWO.replace(
                    "{00000000-0000-0000-0000-000000000000}",
                    "{5fbaabe3-6958-40ff-92a7-860e329aab41}",
                ),
                "loop",
            ),
            (
                TWO.replace(
                    "</Storage></StorageData>",
                    "</Storage><Storage/></StorageData>",
                ),
                "split",
            ),
            (
                TWO.replace("<Snapshots>", "<Snapshots><TopGUID>{12}</TopGUID>"),
                "not listed",
            ),
            (TWO[..200].to_string(), "XML"),
            ("<a/>".to_string(), "root element"),
        ];
        for (text, msg) in cases {
            let e = Bundle::parse(Path::new("/d.hdd"), &text).unwrap_err();
            assert!(e.to_string().contains(msg), "{msg}: {e}");
        }
    }
}
