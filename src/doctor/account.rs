//! The account a check is made for: uid, primary and supplementary groups (from /etc/passwd and
//! /etc/group, the files the service's NSS reads on a server), and what its mode bits allow it.

use std::os::unix::fs::MetadataExt;

/// A user and its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Primary and supplementary group ids.
    pub groups: Vec<u32>,
}

/// Read permission, as in the mode bits' `r`.
pub const READ: u32 = 4;
/// Write permission.
pub const WRITE: u32 = 2;

impl Account {
    /// The account named `name` in /etc/passwd, with its groups from /etc/group.
    pub fn lookup(name: &str) -> Option<Self> {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        let fields: Vec<&str> = passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 4 && f[0] == name)?;
        let (uid, gid) = (fields[2].parse().ok()?, fields[3].parse().ok()?);
        let mut groups = vec![gid];
        for g in group_entries() {
            if g.members.iter().any(|m| m == name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
        Some(Self { name: name.to_owned(), uid, gid, groups })
    }

    /// Whoever runs this process.
    pub fn current() -> Self {
        let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
        let name = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|p| {
                p.lines().map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>()).find(|f| f.len() >= 3 && f[2] == uid.to_string())
            })
            .map(|f| f[0].clone())
            .unwrap_or_else(|| format!("uid {uid}"));
        Self::lookup(&name).unwrap_or(Self { name, uid, gid: u32::MAX, groups: Vec::new() })
    }

    /// Whether the mode bits of `meta` grant `want` ([`READ`] | [`WRITE`]) to this account (root
    /// is granted everything, as the kernel does for read and write).
    pub fn may(&self, meta: &std::fs::Metadata, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            (mode >> 6) & 7
        } else if self.groups.contains(&meta.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn group_entries() -> Vec<GroupEntry> {
    let Ok(text) = std::fs::read_to_string("/etc/group") else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].parse().ok()?,
                members: f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The name of group `gid`, else the number.
pub fn group_name(gid: u32) -> String {
    group_entries().into_iter().find(|g| g.gid == gid).map(|g| g.name).unwrap_or_else(|| gid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_may_everything() {
        let root = Account::lookup("root").unwrap();
        assert_eq!(root.uid, 0);
        let meta = std::fs::metadata("/etc/passwd").unwrap();
        assert!(root.may(&meta, READ | WRITE));
    }

    #[test]
    fn others_follow_the_mode_bits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let stranger = Account { name: "s".into(), uid: 12345, gid: 12345, groups: vec![12345] };
        assert!(!stranger.may(&meta, READ));
        let member = Account { groups: vec![meta.gid()], ..stranger.clone() };
        assert!(member.may(&meta, READ));
        assert!(!member.may(&meta, WRITE));
        let owner = Account { uid: meta.uid(), ..stranger };
        assert!(owner.may(&meta, READ | WRITE) || meta.uid() == 0);
    }
}
