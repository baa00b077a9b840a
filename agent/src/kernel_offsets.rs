//! Resolves the byte offsets the kernel programs need (inside `task_struct`
//! and `mm_struct`) from the running kernel's BTF, so one object file works
//! across kernel builds without compiled-in structure layouts.

use std::path::Path;

use agent_common::KernelOffsets;
use btf_rs::{Btf, Struct, Type};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: anyhow::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF: struct {strukt} has no member {member}")]
    NoMember {
        strukt: &'static str,
        member: &'static str,
    },
    #[error("kernel BTF: {strukt}.{member} is a bit field")]
    BitField {
        strukt: &'static str,
        member: &'static str,
    },
}

/// Reads BTF from `path` and resolves every offset in [`KernelOffsets`].
pub fn resolve_from_file(path: &Path) -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    resolve(&btf)
}

/// Resolves every offset in [`KernelOffsets`] from parsed BTF.
pub fn resolve(btf: &Btf) -> Result<KernelOffsets, OffsetError> {
    let task = find_struct(btf, "task_struct")?;
    let mm = find_struct(btf, "mm_struct")?;
    Ok(KernelOffsets {
        valid: 1,
        task_real_parent: byte_offset(btf, &task, "task_struct", "real_parent")?,
        task_tgid: byte_offset(btf, &task, "task_struct", "tgid")?,
        task_mm: byte_offset(btf, &task, "task_struct", "mm")?,
        mm_arg_start: byte_offset(btf, &mm, "mm_struct", "arg_start")?,
        mm_arg_end: byte_offset(btf, &mm, "mm_struct", "arg_end")?,
    })
}

fn find_struct(btf: &Btf, name: &'static str) -> Result<Struct, OffsetError> {
    btf.resolve_types_by_name(name)
        .map_err(|_| OffsetError::NoStruct(name))?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or(OffsetError::NoStruct(name))
}

fn byte_offset(
    btf: &Btf,
    strukt: &Struct,
    strukt_name: &'static str,
    member: &'static str,
) -> Result<u32, OffsetError> {
    let bits = member_bit_offset(btf, strukt, member).ok_or(OffsetError::NoMember {
        strukt: strukt_name,
        member,
    })?;
    if bits % 8 != 0 {
        return Err(OffsetError::BitField {
            strukt: strukt_name,
            member,
        });
    }
    Ok(bits / 8)
}

/// Offset in bits of `name` in `strukt`, looking through anonymous struct
/// and union members (as in `mm_struct`, whose fields sit in an anonymous
/// struct on current kernels).
fn member_bit_offset(btf: &Btf, strukt: &Struct, name: &str) -> Option<u32> {
    for member in &strukt.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        if member_name == name {
            return Some(member.bit_offset());
        }
        if member_name.is_empty() {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member) {
                if let Some(inner_offset) = member_bit_offset(btf, &inner, name) {
                    return Some(member.bit_offset() + inner_offset);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the running kernel: the offsets must exist, be distinct and
    /// ordered as in every kernel's definition (arg_start before arg_end).
    #[test]
    fn resolves_offsets_of_running_kernel() {
        let offsets = resolve_from_file(Path::new(VMLINUX_BTF))
            .expect("this machine publishes BTF at /sys/kernel/btf/vmlinux");
        assert_eq!(offsets.valid, 1);
        assert!(offsets.task_real_parent > 0);
        assert!(offsets.task_tgid > 0);
        assert_ne!(offsets.task_real_parent, offsets.task_tgid);
        assert_eq!(offsets.mm_arg_end, offsets.mm_arg_start + 8);
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = resolve_from_file(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
