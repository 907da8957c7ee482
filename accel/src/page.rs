//! Page geometry: the session's page size and the keys that name pages.

use core::fmt;

/// A transfer page size: a power of two in `4096..=2097152` bytes, as PROTOCOL.md
/// allows for the handshake's `page_size`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize(u32);

impl PageSize {
    /// The smallest page size, 4 KiB.
    pub const MIN: PageSize = PageSize(4096);
    /// The largest page size, 2 MiB.
    pub const MAX: PageSize = PageSize(2 * 1024 * 1024);
    /// 4 KiB pages.
    pub const KIB4: PageSize = PageSize::MIN;

    /// Checks `bytes` against the protocol's rule; `None` when it is not a power of two
    /// in `4096..=2097152`.
    pub const fn new(bytes: u32) -> Option<PageSize> {
        if bytes.is_power_of_two() && bytes >= Self::MIN.0 && bytes <= Self::MAX.0 {
            Some(PageSize(bytes))
        } else {
            None
        }
    }

    /// The size in bytes.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The size in bytes, as a `usize`.
    pub const fn bytes(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageSize({})", self.0)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Default for PageSize {
    fn default() -> Self {
        Self::KIB4
    }
}

/// A page's identity for the delta cache: any 64-bit value the caller chooses that is
/// unique per page within a session (for example `region << 40 | page_index`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageKey(pub u64);

impl fmt::Debug for PageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageKey({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_follows_the_protocol_rule() {
        assert_eq!(PageSize::new(4096), Some(PageSize::KIB4));
        assert_eq!(
            PageSize::new(2 * 1024 * 1024).map(PageSize::get),
            Some(2 << 20)
        );
        assert_eq!(PageSize::new(2048), None);
        assert_eq!(PageSize::new(4 * 1024 * 1024), None);
        assert_eq!(PageSize::new(12288), None);
        assert_eq!(PageSize::new(0), None);
        assert_eq!(format!("{:?}", PageSize::KIB4), "PageSize(4096)");
    }
}
