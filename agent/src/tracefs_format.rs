//! Field offsets of tracepoint records, read from the tracepoint's `format`
//! file, for fields whose position changed across kernel versions.

use std::{fs, io, path::Path};

/// Where a field sits in a tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Reads `<tracefs>/events/<category>/<name>/format`.
pub fn read_format(tracefs: &Path, category: &str, name: &str) -> io::Result<String> {
    fs::read_to_string(
        tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format"),
    )
}

/// Finds field `name` in the text of a `format` file.
pub fn field(format: &str, name: &str) -> Option<Field> {
    format.lines().find_map(|line| {
        // "\tfield:unsigned long clone_flags;\toffset:32;\tsize:8;\tsigned:0;"
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        let declared = declaration.split_whitespace().last()?.split('[').next()?;
        if declared != name {
            return None;
        }
        let mut offset = None;
        let mut size = None;
        for part in parts {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        Some(Field {
            offset: offset?,
            size: size?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_6_18: &str = "name: sched_process_exit\nID: 364\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\
\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;\n\
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";

    #[test]
    fn finds_fields_by_name() {
        assert_eq!(
            field(EXIT_6_18, "group_dead"),
            Some(Field {
                offset: 32,
                size: 1
            })
        );
        assert_eq!(
            field(EXIT_6_18, "comm"),
            Some(Field {
                offset: 8,
                size: 16
            })
        );
        assert_eq!(
            field(EXIT_6_18, "pid"),
            Some(Field {
                offset: 24,
                size: 4
            })
        );
        assert_eq!(field(EXIT_6_18, "missing"), None);
    }

    #[test]
    fn reads_the_running_kernels_formats() {
        let format = read_format(Path::new("/sys/kernel/tracing"), "task", "task_newtask")
            .expect("tracefs is mounted (deploy/setup.sh mounts it)");
        let flags = field(&format, "clone_flags").expect("task_newtask has clone_flags");
        assert_eq!(flags.size, 8);
    }
}
