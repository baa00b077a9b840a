//! Reads structure layouts from the kernel's BTF (`/sys/kernel/btf/vmlinux`,
//! format: the kernel's `Documentation/bpf/btf.rst`).
//!
//! The agent needs the byte offsets of a few dozen members of a dozen
//! structures, once, at start-up. A general BTF library builds a model of
//! all ~100,000 types with their names in hash maps: parsing this kernel's
//! 5.5 MB of BTF that way took the agent's resident memory to 54 MB for a
//! moment (its start-up peak, above every storm's) and left 15 MB of heap
//! behind. This reader keeps the raw bytes and one offset per type id, and
//! finds a structure by scanning for its name: about 6 MB, given back as
//! soon as the offsets are known.

use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
/// `struct btf_type`: name offset, info, size or type.
const TYPE_HEADER: usize = 12;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> BtfError {
    BtfError::Malformed(what.into())
}

/// A type's id (1, 2, ...; 0 is `void`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeId(u32);

/// Where a member sits in its structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberOffset {
    pub bits: u32,
    /// `Some(width)` for a bit field.
    pub bitfield_bits: Option<u32>,
}

/// One BTF blob, indexed by type id.
#[derive(Debug)]
pub struct KernelBtf {
    data: Vec<u8>,
    big_endian: bool,
    strings: std::ops::Range<usize>,
    /// Byte offset in `data` of type id `i + 1`.
    types: Vec<u32>,
}

/// One decoded `struct btf_type` header.
#[derive(Clone, Copy, Debug)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// Where the kind's own data starts.
    extra: usize,
}

impl KernelBtf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        if data.len() < HEADER_MIN {
            return Err(malformed("shorter than a BTF header"));
        }
        let big_endian = match [data[0], data[1]] {
            m if u16::from_le_bytes(m) == MAGIC => false,
            m if u16::from_be_bytes(m) == MAGIC => true,
            _ => return Err(malformed("bad magic")),
        };
        let mut btf = KernelBtf {
            data,
            big_endian,
            strings: 0..0,
            types: Vec::new(),
        };
        let header_len = btf.u32_at(4)? as usize;
        let [type_off, type_len, str_off, str_len] =
            [8, 12, 16, 20].map(|at| btf.u32_at(at).map(|v| v as usize));
        let (type_off, type_len, str_off, str_len) = (type_off?, type_len?, str_off?, str_len?);
        let section = |off: usize, len: usize| {
            let start = header_len
                .checked_add(off)
                .ok_or_else(|| malformed("section offset overflows"))?;
            let end = start
                .checked_add(len)
                .filter(|&end| end <= btf.data.len())
                .ok_or_else(|| malformed("section runs past the end"))?;
            Ok::<_, BtfError>(start..end)
        };
        let type_section = section(type_off, type_len)?;
        btf.strings = section(str_off, str_len)?;
        let mut at = type_section.start;
        while at < type_section.end {
            btf.types.push(at as u32);
            let header = btf.header_at(at)?;
            at = header.extra + btf.extra_len(&header)?;
        }
        if at != type_section.end {
            return Err(malformed("the last type runs past the type section"));
        }
        Ok(btf)
    }

    fn u32_at(&self, at: usize) -> Result<u32, BtfError> {
        let bytes: [u8; 4] = self
            .data
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("truncated"))?;
        Ok(if self.big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    }

    fn header_at(&self, at: usize) -> Result<TypeHeader, BtfError> {
        let info = self.u32_at(at + 4)?;
        Ok(TypeHeader {
            name_off: self.u32_at(at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(at + 8)?,
            extra: at + TYPE_HEADER,
        })
    }

    /// Bytes of kind-specific data after the header.
    fn extra_len(&self, header: &TypeHeader) -> Result<usize, BtfError> {
        Ok(match header.kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * header.vlen,
            KIND_ENUM | KIND_FUNC_PROTO => 8 * header.vlen,
            KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
            | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
            kind => return Err(malformed(format!("unknown type kind {kind}"))),
        })
    }

    fn header(&self, id: TypeId) -> Result<TypeHeader, BtfError> {
        let at =
            id.0.checked_sub(1)
                .and_then(|i| self.types.get(i as usize))
                .ok_or_else(|| malformed(format!("no type {}", id.0)))?;
        self.header_at(*at as usize)
    }

    /// The string at `offset` of the string section.
    fn name(&self, offset: u32) -> &[u8] {
        let Some(rest) = self
            .data
            .get(self.strings.start + offset as usize..self.strings.end)
        else {
            return &[];
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The first structure named `name` (a full definition, not a forward
    /// declaration).
    pub fn find_struct(&self, name: &str) -> Option<TypeId> {
        (0..self.types.len()).find_map(|i| {
            let header = self.header_at(self.types[i] as usize).ok()?;
            (header.kind == KIND_STRUCT && self.name(header.name_off) == name.as_bytes())
                .then_some(TypeId(i as u32 + 1))
        })
    }

    /// The offset of member `name` of the structure or union `id`, looking
    /// through anonymous structure and union members (as in `mm_struct`,
    /// whose fields sit in an anonymous struct on current kernels).
    pub fn member_offset(&self, id: TypeId, name: &str) -> Option<MemberOffset> {
        self.member_offset_within(id, name, 0)
    }

    fn member_offset_within(&self, id: TypeId, name: &str, depth: u32) -> Option<MemberOffset> {
        // Anonymous members nest a few levels deep at most.
        if depth > 16 {
            return None;
        }
        let header = self.header(id).ok()?;
        if header.kind != KIND_STRUCT && header.kind != KIND_UNION {
            return None;
        }
        for i in 0..header.vlen {
            let at = header.extra + 12 * i;
            let member_name = self.name(self.u32_at(at).ok()?);
            let member_type = TypeId(self.u32_at(at + 4).ok()?);
            let offset = self.u32_at(at + 8).ok()?;
            let (bits, bitfield_bits) = if header.kind_flag {
                (offset & 0x00ff_ffff, Some(offset >> 24).filter(|&w| w != 0))
            } else {
                (offset, None)
            };
            if member_name == name.as_bytes() {
                return Some(MemberOffset {
                    bits,
                    bitfield_bits,
                });
            }
            if member_name.is_empty() {
                let inner = self.strip_modifiers(member_type)?;
                if let Some(found) = self.member_offset_within(inner, name, depth + 1) {
                    return Some(MemberOffset {
                        bits: bits + found.bits,
                        ..found
                    });
                }
            }
        }
        None
    }

    /// `id` with typedefs and qualifiers followed to the type they name.
    fn strip_modifiers(&self, mut id: TypeId) -> Option<TypeId> {
        for _ in 0..32 {
            let header = self.header(id).ok()?;
            match header.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = TypeId(header.size_or_type);
                }
                _ => return Some(id),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little BTF blob built by hand.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let at = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            at
        }

        fn header(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size: u32) {
            let name = self.string(name);
            let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
            for v in [name, info, size] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }

        fn int(&mut self, name: &str) {
            self.header(name, KIND_INT, 0, false, 4);
            self.types.extend_from_slice(&32u32.to_le_bytes());
        }

        fn members(&mut self, name: &str, kind: u32, kflag: bool, members: &[(&str, u32, u32)]) {
            self.header(name, kind, members.len() as u32, kflag, 64);
            for (member, ty, offset) in members {
                let member = self.string(member);
                for v in [member, *ty, *offset] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
        }

        fn build(self) -> Vec<u8> {
            let mut blob = Vec::new();
            blob.extend_from_slice(&MAGIC.to_le_bytes());
            blob.extend_from_slice(&[1, 0]);
            for v in [
                HEADER_MIN as u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                blob.extend_from_slice(&v.to_le_bytes());
            }
            blob.extend(self.types);
            blob.extend(self.strings);
            blob
        }
    }

    /// 1: int; 2: union { int a; int b; }; 3: const (2); 4: struct outer
    /// { int x @0; <anonymous const union> @64; int flag:3 @96 (kflag) };
    /// 5: a forward declaration named like a struct; 6: struct outer_fwd.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.int("int");
        b.members("", KIND_UNION, false, &[("a", 1, 0), ("b", 1, 0)]);
        b.header("", KIND_CONST, 0, false, 2);
        b.members(
            "outer",
            KIND_STRUCT,
            true,
            &[("x", 1, 0), ("", 3, 64), ("flag", 1, (3 << 24) | 96)],
        );
        b.header("fwd_only", KIND_FWD, 0, false, 0);
        b.members("fwd_only", KIND_STRUCT, false, &[("y", 1, 32)]);
        b.build()
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_marks_bit_fields() {
        let btf = KernelBtf::parse(sample()).unwrap();
        let outer = btf.find_struct("outer").unwrap();
        assert_eq!(outer, TypeId(4));
        let at = |name| btf.member_offset(outer, name);
        assert_eq!(
            at("x"),
            Some(MemberOffset {
                bits: 0,
                bitfield_bits: None
            })
        );
        assert_eq!(
            at("b").map(|m| m.bits),
            Some(64),
            "through the anonymous union"
        );
        assert_eq!(
            at("flag"),
            Some(MemberOffset {
                bits: 96,
                bitfield_bits: Some(3)
            })
        );
        assert_eq!(at("missing"), None);
        // The definition, not the forward declaration before it.
        let fwd = btf.find_struct("fwd_only").unwrap();
        assert_eq!(fwd, TypeId(6));
        assert_eq!(btf.member_offset(fwd, "y").map(|m| m.bits), Some(32));
        assert_eq!(btf.find_struct("int"), None, "an int is not a struct");
        assert_eq!(btf.find_struct("nothing"), None);
    }

    #[test]
    fn malformed_blobs_are_errors() {
        let blob = sample();
        assert!(KernelBtf::parse(blob[..10].to_vec()).is_err(), "short");
        let mut bad_magic = blob.clone();
        bad_magic[0] = 0;
        assert!(KernelBtf::parse(bad_magic).is_err());
        // The type section claims more than the file holds.
        let mut long = blob.clone();
        long[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(KernelBtf::parse(long).is_err());
        // A type cut in the middle.
        let mut cut = blob.clone();
        let type_len = u32::from_le_bytes(cut[12..16].try_into().unwrap());
        cut[12..16].copy_from_slice(&(type_len - 4).to_le_bytes());
        assert!(KernelBtf::parse(cut).is_err());
        // An unknown kind.
        let mut unknown = blob;
        unknown[HEADER_MIN + 7] = 30;
        assert!(KernelBtf::parse(unknown).is_err());
        let missing = KernelBtf::from_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/vmlinux"));
    }

    /// The running kernel's BTF read both ways: every named member of the
    /// structures the agent uses sits where the general library says.
    #[test]
    fn agrees_with_btf_rs_on_the_running_kernel() {
        let path = Path::new(crate::kernel_offsets::VMLINUX_BTF);
        let ours = KernelBtf::from_file(path).unwrap();
        let theirs = btf_rs::Btf::from_file(path).unwrap();
        let structs = [
            "task_struct",
            "mm_struct",
            "cred",
            "signal_struct",
            "tcp_sock",
            "sock",
            "file",
            "inode",
            "super_block",
        ];
        let mut compared = 0;
        for name in structs {
            let id = ours.find_struct(name).unwrap_or_else(|| panic!("{name}"));
            let strukt = theirs
                .resolve_types_by_name(name)
                .unwrap()
                .into_iter()
                .find_map(|t| match t {
                    btf_rs::Type::Struct(s) => Some(s),
                    _ => None,
                })
                .unwrap();
            for member in &strukt.members {
                let member_name = theirs.resolve_name(member).unwrap_or_default();
                if member_name.is_empty() {
                    continue;
                }
                let found = ours
                    .member_offset(id, &member_name)
                    .unwrap_or_else(|| panic!("{name}.{member_name}"));
                assert_eq!(found.bits, member.bit_offset(), "{name}.{member_name}");
                assert_eq!(
                    found.bitfield_bits,
                    member.bitfield_size().filter(|&w| w != 0),
                    "{name}.{member_name}"
                );
                compared += 1;
            }
        }
        assert!(compared > 300, "only {compared} members compared");
    }
}
