//! The page pool: fixed-size pages of `[c_kv | k_pe]` rows under a page budget, and the prefix
//! index of full pages (hash of the page's tokens and of its prefix → page), reference-counted
//! through `Arc` and evicted least recently used first when a new page needs room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{KvDtype, KvLayout};

#[derive(Debug)]
enum PageData {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    /// A page of budget only, no values: the DeepSeek-V4 cache keeps its state in its own
    /// buffers and holds pages to count what that state may take ([`KvPool::reserve`]).
    Reserved,
}

/// One page: `[layers, page_tokens, width]` values. Dropping it returns it to the pool's count.
#[derive(Debug)]
pub struct Page {
    data: PageData,
    live: Arc<AtomicUsize>,
}

/// A layer's rows of a page, as stored.
#[derive(Debug, Clone, Copy)]
pub enum PageRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Drop for Page {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn to_bf16(v: f32) -> u16 {
    // Round to nearest even (NaN stays NaN: its payload keeps a high mantissa bit).
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

impl Page {
    /// The rows of `layer` (`page_tokens × width` values).
    pub fn rows(&self, layout: &KvLayout, layer: usize) -> PageRows<'_> {
        let n = layout.page_tokens * layout.width;
        match &self.data {
            PageData::F32(v) => PageRows::F32(&v[layer * n..][..n]),
            PageData::Bf16(v) => PageRows::Bf16(&v[layer * n..][..n]),
            PageData::Reserved => PageRows::F32(&[]),
        }
    }

    /// Appends rows `tokens` (token slots of this page) of `layer` to `out` as f32 (bf16 pages
    /// widened).
    pub fn extend_rows_f32(
        &self,
        layout: &KvLayout,
        layer: usize,
        tokens: std::ops::Range<usize>,
        out: &mut Vec<f32>,
    ) {
        let range = tokens.start * layout.width..tokens.end * layout.width;
        match self.rows(layout, layer) {
            PageRows::F32(v) => out.extend_from_slice(&v[range]),
            // A slice map has an exact length: one reservation, no zero fill first.
            PageRows::Bf16(v) => {
                out.extend(v[range].iter().map(|&b| f32::from_bits(u32::from(b) << 16)))
            }
        }
    }

    /// Writes `rows` (whole rows) into `layer` from token `slot` on.
    pub(crate) fn write(&mut self, layout: &KvLayout, layer: usize, slot: usize, rows: &[f32]) {
        let at = (layer * layout.page_tokens + slot) * layout.width;
        match &mut self.data {
            PageData::F32(v) => v[at..at + rows.len()].copy_from_slice(rows),
            PageData::Bf16(v) => {
                for (d, &s) in v[at..at + rows.len()].iter_mut().zip(rows) {
                    *d = to_bf16(s);
                }
            }
            PageData::Reserved => {}
        }
    }

    /// Copies every value of `other` (same layout).
    pub(crate) fn copy_from(&mut self, other: &Page) {
        match (&mut self.data, &other.data) {
            (PageData::F32(d), PageData::F32(s)) => d.copy_from_slice(s),
            (PageData::Bf16(d), PageData::Bf16(s)) => d.copy_from_slice(s),
            (PageData::Reserved, PageData::Reserved) => {}
            _ => unreachable!("pages of one pool share a dtype"),
        }
    }
}

/// A full page in the prefix index.
#[derive(Debug)]
struct Entry {
    page: Arc<Page>,
    parent: u64,
    tokens: Vec<u32>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Index {
    map: HashMap<u64, Entry>,
    tick: u64,
}

#[derive(Debug)]
struct Shared {
    layout: KvLayout,
    capacity: usize,
    prefix_caching: bool,
    live: Arc<AtomicUsize>,
    index: Mutex<Index>,
    queried: AtomicU64,
    hits: AtomicU64,
}

/// The pages of every sequence of one engine (cheap to clone; clones share the pool).
#[derive(Debug, Clone)]
pub struct KvPool {
    shared: Arc<Shared>,
}

/// Counters of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages the budget allows.
    pub capacity: usize,
    /// Pages that exist (held by sequences or by the prefix index).
    pub live: usize,
    /// Pages in the prefix index.
    pub cached: usize,
    /// Cached pages no sequence holds (evicted first when room is needed).
    pub evictable: usize,
    /// Full prompt pages looked up in the prefix index, and those found.
    pub queried: u64,
    pub hits: u64,
}

impl PoolStats {
    /// Pages a new allocation can get: never allocated plus evictable.
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.live) + self.evictable
    }

    /// Pages held by sequences.
    pub fn used(&self) -> usize {
        self.live - self.evictable
    }
}

/// The hash of a full page: FNV-1a over the prefix hash and the page's tokens.
pub fn page_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent
        .to_le_bytes()
        .into_iter()
        .chain(tokens.iter().flat_map(|t| t.to_le_bytes()))
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl KvPool {
    /// A pool of at most `capacity` pages (`None`: unbounded).
    pub fn new(layout: KvLayout, capacity: Option<usize>, prefix_caching: bool) -> KvPool {
        KvPool {
            shared: Arc::new(Shared {
                layout,
                capacity: capacity.unwrap_or(usize::MAX),
                prefix_caching,
                live: Arc::new(AtomicUsize::new(0)),
                index: Mutex::new(Index::default()),
                queried: AtomicU64::new(0),
                hits: AtomicU64::new(0),
            }),
        }
    }

    /// The page shape.
    pub fn layout(&self) -> &KvLayout {
        &self.shared.layout
    }

    /// Whether full pages are shared between sequences.
    pub fn prefix_caching(&self) -> bool {
        self.shared.prefix_caching
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index inconsistent (every update is
        // one insert or remove), so a poisoned lock is used as is.
        self.shared.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        let idx = self.index();
        let evictable = idx
            .map
            .values()
            .filter(|e| Arc::strong_count(&e.page) == 1)
            .count();
        PoolStats {
            capacity: self.shared.capacity,
            live: self.shared.live.load(Ordering::SeqCst),
            cached: idx.map.len(),
            evictable,
            queried: self.shared.queried.load(Ordering::Relaxed),
            hits: self.shared.hits.load(Ordering::Relaxed),
        }
    }

    /// A zeroed page, evicting the least recently used unreferenced cached page when the budget
    /// is spent; `None` when every page is in use.
    pub(crate) fn alloc(&self) -> Option<Page> {
        self.take(true)
    }

    /// A page of budget without values (for caches that keep their state elsewhere and count
    /// it in pages); `None` when every page is in use.
    pub fn reserve(&self) -> Option<Page> {
        self.take(false)
    }

    fn take(&self, with_values: bool) -> Option<Page> {
        let mut idx = self.index();
        if self.shared.live.load(Ordering::SeqCst) >= self.shared.capacity {
            let victim = idx
                .map
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.page) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&h, _)| h)?;
            idx.map.remove(&victim); // drops the page: `live` goes down
        }
        self.shared.live.fetch_add(1, Ordering::SeqCst);
        drop(idx);
        let n = self.shared.layout.page_elems();
        let data = match self.shared.layout.dtype {
            _ if !with_values => PageData::Reserved,
            KvDtype::F32 => PageData::F32(vec![0.0; n]),
            KvDtype::Bf16 => PageData::Bf16(vec![0; n]),
        };
        Some(Page {
            data,
            live: self.shared.live.clone(),
        })
    }

    /// The cached page with hash `hash` whose tokens and prefix are `tokens` and `parent`.
    pub(crate) fn lookup(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<Arc<Page>> {
        self.shared.queried.fetch_add(1, Ordering::Relaxed);
        let mut idx = self.index();
        idx.tick += 1;
        let tick = idx.tick;
        let e = idx.map.get_mut(&hash)?;
        if e.parent != parent || e.tokens != tokens {
            return None; // a hash collision: not the same prefix
        }
        e.last_used = tick;
        self.shared.hits.fetch_add(1, Ordering::Relaxed);
        Some(e.page.clone())
    }

    /// Offers a full page to the prefix index (kept if that prefix is not cached yet).
    pub(crate) fn register(&self, hash: u64, parent: u64, tokens: &[u32], page: &Arc<Page>) {
        if !self.shared.prefix_caching {
            return;
        }
        let mut idx = self.index();
        idx.tick += 1;
        let tick = idx.tick;
        idx.map
            .entry(hash)
            .and_modify(|e| e.last_used = tick)
            .or_insert_with(|| Entry {
                page: page.clone(),
                parent,
                tokens: tokens.to_vec(),
                last_used: tick,
            });
    }

    /// Drops every cached page no sequence holds.
    pub fn clear_cached(&self) {
        self.index()
            .map
            .retain(|_, e| Arc::strong_count(&e.page) > 1);
    }
}
