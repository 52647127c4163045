//! Page accounting, prefix sharing and eviction of the pool, on a small synthetic layout.

use std::sync::Arc;

use super::*;

fn layout(dtype: KvDtype) -> KvLayout {
    KvLayout {
        layers: 2,
        width: 3,
        page_tokens: 4,
        dtype,
        fixed_pages: 0,
    }
}

/// Runs a "forward pass" of `tokens`: rows derived from the token and the layer.
fn feed(c: &mut SeqCache, tokens: &[u32]) -> crate::Result<()> {
    c.prepare(tokens)?;
    let w = c.width();
    for layer in 0..c.layout().layers {
        let rows: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| (0..w).map(move |j| (t * 10 + j as u32 + layer as u32 * 100) as f32))
            .collect();
        c.write(layer, &rows);
    }
    c.commit();
    Ok(())
}

/// Every row of `layer`, read back through the page table.
fn read(c: &SeqCache, layer: usize) -> Vec<f32> {
    let l = *c.layout();
    let mut out = Vec::new();
    for (p, page) in c.pages().iter().enumerate() {
        let n = l.page_tokens.min(c.len() - p * l.page_tokens);
        page.extend_rows_f32(&l, layer, 0..n, &mut out);
    }
    out
}

#[test]
fn pages_are_allocated_as_tokens_arrive_and_freed_on_release() {
    let pool = KvPool::new(layout(KvDtype::F32), Some(8), false);
    let mut a = SeqCache::in_pool(&pool);
    feed(&mut a, &[1, 2, 3]).expect("fits");
    assert_eq!((a.pages().len(), pool.stats().live), (1, 1));
    feed(&mut a, &[4, 5]).expect("fits");
    assert_eq!((a.len(), a.pages().len(), pool.stats().live), (5, 2, 2));
    let rows = read(&a, 1);
    assert_eq!(rows.len(), 5 * 3);
    assert_eq!(&rows[12..], &[150.0, 151.0, 152.0]); // token 5, layer 1
    a.truncate(4);
    assert_eq!((a.pages().len(), pool.stats().live), (1, 1));
    a.release();
    assert_eq!(pool.stats().live, 0);
    let mut b = SeqCache::in_pool(&pool);
    feed(&mut b, &[7; 9]).expect("fits");
    drop(b); // dropping a cache gives its pages back too
    assert_eq!(pool.stats().live, 0);
}

#[test]
fn a_full_pool_refuses_and_leaves_the_cache_unchanged() {
    let pool = KvPool::new(layout(KvDtype::F32), Some(2), false);
    let mut a = SeqCache::in_pool(&pool);
    feed(&mut a, &[1, 2, 3, 4, 5]).expect("two pages");
    let err = feed(&mut a, &[6, 7, 8, 9]).expect_err("a third page");
    assert!(
        matches!(err, crate::ModelError::KvCacheFull { needed: 1, .. }),
        "{err}"
    );
    assert_eq!((a.len(), a.pages().len(), pool.stats().live), (5, 2, 2));
    assert_eq!(pool.stats().free(), 0);
}

#[test]
fn full_pages_are_shared_by_prompts_with_the_same_prefix() {
    let pool = KvPool::new(layout(KvDtype::F32), Some(16), true);
    let prompt: Vec<u32> = (1..=10).collect();
    let mut a = SeqCache::in_pool(&pool);
    feed(&mut a, &prompt).expect("fits");
    assert_eq!(pool.stats().cached, 2); // tokens 1-4 and 5-8

    let mut b = SeqCache::in_pool(&pool);
    assert_eq!(b.adopt_prefix(&prompt), 8);
    assert_eq!(b.shared_pages(), 2);
    feed(&mut b, &prompt[8..]).expect("fits");
    assert_eq!(read(&a, 0), read(&b, 0));
    assert_eq!(read(&a, 1), read(&b, 1));
    assert_eq!(
        pool.stats().live,
        4,
        "two shared pages and one tail page each"
    );
    let s = pool.stats();
    assert_eq!((s.queried, s.hits), (2, 2));

    // A different second page: only the first is shared.
    let mut other = prompt.clone();
    other[5] = 99;
    let mut c = SeqCache::in_pool(&pool);
    assert_eq!(c.adopt_prefix(&other), 4);
    // At least one prompt token is always left to compute.
    let mut d = SeqCache::in_pool(&pool);
    assert_eq!(d.adopt_prefix(&prompt[..8]), 4);
}

#[test]
fn writing_after_a_truncation_into_a_shared_page_copies_it() {
    let pool = KvPool::new(layout(KvDtype::F32), Some(16), true);
    let mut a = SeqCache::in_pool(&pool);
    feed(&mut a, &[1, 2, 3, 4]).expect("fits");
    let mut b = SeqCache::in_pool(&pool);
    assert_eq!(b.adopt_prefix(&[1, 2, 3, 4, 5]), 4);
    b.truncate(2);
    assert_eq!(b.pages_needed(1), 1, "the shared page is copied");
    feed(&mut b, &[9]).expect("fits");
    assert!(!Arc::ptr_eq(&a.pages()[0], &b.pages()[0]));
    assert_eq!(
        read(&a, 0)[6..9],
        [30.0, 31.0, 32.0],
        "a's page is untouched"
    );
    assert_eq!(read(&b, 0)[6..9], [90.0, 91.0, 92.0]);
}

#[test]
fn unreferenced_cached_pages_are_evicted_least_recently_used_first() {
    let pool = KvPool::new(layout(KvDtype::F32), Some(3), true);
    for first in [10u32, 20, 30] {
        let mut c = SeqCache::in_pool(&pool);
        feed(&mut c, &[first, 1, 2, 3]).expect("fits");
    }
    let s = pool.stats();
    assert_eq!((s.live, s.cached, s.evictable, s.free()), (3, 3, 3, 3));
    // Touch the oldest so that the 20-page is now the least recently used.
    let mut keep = SeqCache::in_pool(&pool);
    assert_eq!(keep.adopt_prefix(&[10, 1, 2, 3, 0]), 4);
    let mut n = SeqCache::in_pool(&pool);
    feed(&mut n, &[40]).expect("evicts one");
    let mut probe = SeqCache::in_pool(&pool);
    assert_eq!(probe.adopt_prefix(&[20, 1, 2, 3, 0]), 0, "evicted");
    assert_eq!(probe.adopt_prefix(&[30, 1, 2, 3, 0]), 4, "kept");
    // Pages a sequence holds are never evicted.
    let mut m = SeqCache::in_pool(&pool);
    let err = feed(&mut m, &[50, 51, 52, 53, 54]).expect_err("nothing evictable");
    assert!(matches!(err, crate::ModelError::KvCacheFull { .. }));
}

#[test]
fn bf16_pages_round_to_nearest_even_and_halve_the_bytes() {
    let l32 = layout(KvDtype::F32);
    let l16 = layout(KvDtype::Bf16);
    assert_eq!(l32.bytes_per_token(), 2 * l16.bytes_per_token());
    let pool = KvPool::new(l16, None, false);
    let mut c = SeqCache::in_pool(&pool);
    c.prepare(&[0]).expect("fits");
    let x = 1.0 + 6.0 / 512.0; // halfway between 1 + 4/512 and 1 + 8/512: to the even one
    c.write(0, &[x, -2.5, 1e-3]);
    c.write(1, &[0.0; 3]);
    c.commit();
    let got = read(&c, 0);
    assert_eq!(got[0], 1.0 + 8.0 / 512.0);
    assert_eq!(got[1], -2.5);
    assert!((got[2] - 1e-3).abs() < 1e-3 / 128.0);
}

#[test]
fn the_v3_shape_is_70272_bytes_per_token_in_bf16() {
    let l = KvLayout {
        layers: 61,
        width: 512 + 64,
        page_tokens: DEFAULT_PAGE_TOKENS,
        dtype: KvDtype::Bf16,
        fixed_pages: 0,
    };
    assert_eq!(l.bytes_per_token(), 61 * 576 * 2);
    assert_eq!(l.pages_for(4096), 256);
    assert_eq!(l.pages_for(4097), 257);
}
