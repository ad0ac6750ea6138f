//! Validation of the cluster-wide disk namespace and of disk sizes.
//!
//! Pure functions, no I/O. A [`DiskName`] is `volume/dir/.../disk.img`: the first
//! component names a registered volume, the rest is a path relative to that volume's
//! root. Everything that could escape the volume (`..`, absolute paths, empty
//! components) or confuse the fence records (the reserved `.fence` suffixes) is
//! refused here, before any file is touched. Symlinks are a property of the file
//! system, so they are checked by `volume` when the name is resolved.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted disk name, in bytes.
pub const NAME_LEN_MAX_BYTES: usize = 1024;
/// Longest accepted path component, in bytes (the usual `NAME_MAX`).
pub const COMPONENT_LEN_MAX_BYTES: usize = 255;
/// Deepest accepted name: volume + up to 15 directories + file.
pub const COMPONENTS_MAX: usize = 17;
/// Disk sizes are whole sectors of this many bytes.
pub const SECTOR_SIZE_BYTES: u64 = 512;
/// Largest disk this crate will create or grow to: 64 TiB.
pub const DISK_SIZE_MAX_BYTES: u64 = 64 << 40;
/// Suffix of the fence record kept beside each disk.
pub const FENCE_SUFFIX: &str = ".fence";
/// Marker in the names of temporary files used to replace fence records.
pub const FENCE_TMP_MARKER: &str = ".fence.tmp";

/// Why a disk or volume name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len_bytes} bytes long, the limit is {NAME_LEN_MAX_BYTES}")]
    TooLong { len_bytes: usize },
    #[error(
        "name {name:?} is absolute; names are relative to the namespace (volume/dir/disk.img)"
    )]
    Absolute { name: String },
    #[error("name {name:?} has an empty component (leading, trailing or doubled '/')")]
    EmptyComponent { name: String },
    #[error("name {name:?} has a '.' or '..' component, which could escape the volume")]
    DotComponent { name: String },
    #[error("name {name:?} contains control character {ch:?}")]
    ControlChar { name: String, ch: char },
    #[error("name {name:?} contains a backslash")]
    Backslash { name: String },
    #[error(
        "component {component:?} is {len_bytes} bytes long, the limit is {COMPONENT_LEN_MAX_BYTES}"
    )]
    ComponentTooLong { component: String, len_bytes: usize },
    #[error("name {name:?} has {count} components, the limit is {COMPONENTS_MAX}")]
    TooDeep { name: String, count: usize },
    #[error("name {name:?} names no disk: expected volume/[dir/...]disk")]
    NoDiskComponent { name: String },
    #[error("name {name:?} ends in a reserved fence-record suffix ({FENCE_SUFFIX}, {FENCE_TMP_MARKER}*)")]
    ReservedSuffix { name: String },
    #[error("volume name {name:?} must be a single path component")]
    VolumeNameHasSlash { name: String },
}

/// Why a disk size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("disk size is zero")]
    Zero,
    #[error(
        "disk size {size_bytes} bytes exceeds the limit of {DISK_SIZE_MAX_BYTES} bytes (64 TiB)"
    )]
    TooLarge { size_bytes: u64 },
    #[error(
        "disk size {size_bytes} bytes is not a multiple of the {SECTOR_SIZE_BYTES}-byte sector"
    )]
    NotSectorMultiple { size_bytes: u64 },
}

/// A validated name in the cluster-wide disk namespace: `volume/dir/disk.img`.
///
/// Constructed only through [`DiskName::parse`] (also on deserialisation), so holding
/// one proves the syntactic rules hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DiskName(String);

impl DiskName {
    /// Validates `name` and wraps it.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        validate_disk_name(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The whole name, `volume/dir/disk.img`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The volume component.
    pub fn volume(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }

    /// The path below the volume root (`dir/disk.img`).
    pub fn relative_path(&self) -> &str {
        self.0
            .split_once('/')
            .map(|(_, rest)| rest)
            .unwrap_or_default()
    }
}

impl fmt::Display for DiskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for DiskName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        validate_disk_name(&value)?;
        Ok(Self(value))
    }
}

impl From<DiskName> for String {
    fn from(value: DiskName) -> Self {
        value.0
    }
}

impl std::str::FromStr for DiskName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_components(name: &str) -> Result<usize, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_LEN_MAX_BYTES {
        return Err(NameError::TooLong {
            len_bytes: name.len(),
        });
    }
    if name.starts_with('/') {
        return Err(NameError::Absolute { name: name.into() });
    }
    if let Some(ch) = name.chars().find(|c| c.is_control()) {
        return Err(NameError::ControlChar {
            name: name.into(),
            ch,
        });
    }
    if name.contains('\\') {
        return Err(NameError::Backslash { name: name.into() });
    }
    let mut count = 0;
    for component in name.split('/') {
        count += 1;
        if component.is_empty() {
            return Err(NameError::EmptyComponent { name: name.into() });
        }
        if component == "." || component == ".." {
            return Err(NameError::DotComponent { name: name.into() });
        }
        if component.len() > COMPONENT_LEN_MAX_BYTES {
            return Err(NameError::ComponentTooLong {
                component: component.into(),
                len_bytes: component.len(),
            });
        }
    }
    if count > COMPONENTS_MAX {
        return Err(NameError::TooDeep {
            name: name.into(),
            count,
        });
    }
    Ok(count)
}

/// Checks a disk name (`volume/[dir/...]disk`) without touching the file system.
pub fn validate_disk_name(name: &str) -> Result<(), NameError> {
    let count = validate_components(name)?;
    if count < 2 {
        return Err(NameError::NoDiskComponent { name: name.into() });
    }
    let file = name.rsplit('/').next().unwrap_or_default();
    if file.ends_with(FENCE_SUFFIX) || file.contains(FENCE_TMP_MARKER) {
        return Err(NameError::ReservedSuffix { name: name.into() });
    }
    Ok(())
}

/// Checks a volume name: one component under the same character rules as disk names.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    let count = validate_components(name)?;
    if count != 1 {
        return Err(NameError::VolumeNameHasSlash { name: name.into() });
    }
    Ok(())
}

/// Checks a disk size: non-zero, whole sectors, at most [`DISK_SIZE_MAX_BYTES`].
pub fn validate_disk_size(size_bytes: u64) -> Result<u64, SizeError> {
    if size_bytes == 0 {
        return Err(SizeError::Zero);
    }
    if size_bytes > DISK_SIZE_MAX_BYTES {
        return Err(SizeError::TooLarge { size_bytes });
    }
    if !size_bytes.is_multiple_of(SECTOR_SIZE_BYTES) {
        return Err(SizeError::NotSectorMultiple { size_bytes });
    }
    Ok(size_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        let n = DiskName::parse("vol1/vms/web/root.img").unwrap();
        assert_eq!(n.volume(), "vol1");
        assert_eq!(n.relative_path(), "vms/web/root.img");
        assert_eq!(n.to_string(), "vol1/vms/web/root.img");
        assert!(DiskName::parse("v/d").is_ok());
    }

    type Check = fn(&NameError) -> bool;

    #[test]
    fn refuses_escapes_and_junk() {
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, NameError::Empty)),
            ("/etc/passwd", |e| matches!(e, NameError::Absolute { .. })),
            ("vol/../other/x.img", |e| {
                matches!(e, NameError::DotComponent { .. })
            }),
            ("vol/./x.img", |e| {
                matches!(e, NameError::DotComponent { .. })
            }),
            ("vol/..", |e| matches!(e, NameError::DotComponent { .. })),
            ("vol//x.img", |e| {
                matches!(e, NameError::EmptyComponent { .. })
            }),
            ("vol/x.img/", |e| {
                matches!(e, NameError::EmptyComponent { .. })
            }),
            ("vol/x\n.img", |e| {
                matches!(e, NameError::ControlChar { .. })
            }),
            ("vol/x\0.img", |e| {
                matches!(e, NameError::ControlChar { .. })
            }),
            ("vol\\..\\x", |e| matches!(e, NameError::Backslash { .. })),
            ("vol", |e| matches!(e, NameError::NoDiskComponent { .. })),
            ("vol/x.img.fence", |e| {
                matches!(e, NameError::ReservedSuffix { .. })
            }),
            ("vol/x.img.fence.tmp.3", |e| {
                matches!(e, NameError::ReservedSuffix { .. })
            }),
        ];
        for (name, check) in cases {
            let err = DiskName::parse(name).expect_err(name);
            assert!(check(&err), "{name:?} gave {err:?}");
        }
        let long = format!("vol/{}", "a".repeat(300));
        assert!(matches!(
            DiskName::parse(&long),
            Err(NameError::ComponentTooLong { len_bytes: 300, .. })
        ));
        let deep = format!("vol/{}x", "d/".repeat(20));
        assert!(matches!(
            DiskName::parse(&deep),
            Err(NameError::TooDeep { .. })
        ));
        let huge = "a/".repeat(600);
        assert!(matches!(
            DiskName::parse(&huge),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn volume_names_are_one_component() {
        assert!(validate_volume_name("vol1").is_ok());
        assert!(matches!(
            validate_volume_name("a/b"),
            Err(NameError::VolumeNameHasSlash { .. })
        ));
        assert!(matches!(
            validate_volume_name(".."),
            Err(NameError::DotComponent { .. })
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(validate_disk_size(0), Err(SizeError::Zero));
        assert_eq!(
            validate_disk_size(513),
            Err(SizeError::NotSectorMultiple { size_bytes: 513 })
        );
        assert_eq!(
            validate_disk_size(u64::MAX),
            Err(SizeError::TooLarge {
                size_bytes: u64::MAX
            })
        );
        assert_eq!(validate_disk_size(512), Ok(512));
        assert_eq!(
            validate_disk_size(DISK_SIZE_MAX_BYTES),
            Ok(DISK_SIZE_MAX_BYTES)
        );
    }

    #[test]
    fn deserialisation_validates() {
        let ok: DiskName = serde_json_like("\"v/d.img\"").unwrap();
        assert_eq!(ok.as_str(), "v/d.img");
        assert!(serde_json_like("\"v/../d.img\"").is_err());
    }

    /// bincode round trip through a String, which exercises `try_from`.
    fn serde_json_like(quoted: &str) -> Result<DiskName, bincode::Error> {
        let s = quoted.trim_matches('"').to_owned();
        let bytes = bincode::serialize(&s)?;
        bincode::deserialize(&bytes)
    }
}
