//! A buffer pool for device-resident tensors: freed storage buffers are kept by size class (a power
//! of two of at least 256 bytes, capped at the binding limit) and handed out again, so steady-state
//! work does not allocate. Pooled bytes are bounded; past the bound a freed buffer is dropped.

use std::collections::HashMap;

/// Freed buffers by size class.
#[derive(Debug, Default)]
pub(super) struct BufferPool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    pooled_bytes: u64,
    max_pooled_bytes: u64,
}

impl BufferPool {
    pub(super) fn new(max_pooled_bytes: u64) -> Self {
        Self { free: HashMap::new(), pooled_bytes: 0, max_pooled_bytes }
    }

    /// The size class for a request of `bytes`, never above `max_binding`.
    pub(super) fn class(bytes: u64, max_binding: u64) -> u64 {
        bytes.max(256).next_power_of_two().min(max_binding).max(bytes)
    }

    pub(super) fn take(&mut self, class: u64) -> Option<wgpu::Buffer> {
        let buf = self.free.get_mut(&class)?.pop()?;
        self.pooled_bytes -= class;
        Some(buf)
    }

    /// Keeps `buf` for reuse, or drops it (releasing device memory) when the pool is full.
    pub(super) fn put(&mut self, buf: wgpu::Buffer) {
        let class = buf.size();
        if self.pooled_bytes + class <= self.max_pooled_bytes {
            self.pooled_bytes += class;
            self.free.entry(class).or_default().push(buf);
        }
    }

    pub(super) fn pooled_bytes(&self) -> u64 {
        self.pooled_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn size_classes() {
        assert_eq!(BufferPool::class(4, 1 << 27), 256);
        assert_eq!(BufferPool::class(257, 1 << 27), 512);
        assert_eq!(BufferPool::class(100 << 20, 128 << 20), 128 << 20);
        assert_eq!(BufferPool::class(129 << 20, 128 << 20), 129 << 20);
    }
}
