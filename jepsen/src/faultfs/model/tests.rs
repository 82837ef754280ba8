use super::*;

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// A file `f` in the root with `bytes`, its data and its name both durable.
fn durable_file(m: &mut Model, f: &str, bytes: &[u8]) -> Ino {
    let a = m.create(ROOT, name(f), 0o644).unwrap();
    m.write(a.ino, 0, bytes).unwrap();
    m.sync(a.ino).unwrap();
    m.sync(ROOT).unwrap();
    a.ino
}

fn content(m: &Model, f: &str) -> Option<Vec<u8>> {
    let a = m.lookup(ROOT, name(f)).ok()?;
    Some(m.read(a.ino, 0, a.size as usize).unwrap())
}

#[test]
fn synced_bytes_survive_and_unsynced_bytes_are_lost() {
    let mut m = Model::new(1 << 20);
    let ino = durable_file(&mut m, "wal", b"entry-1;");
    m.write(ino, 8, b"entry-2;").unwrap();
    assert_eq!(content(&m, "wal").unwrap(), b"entry-1;entry-2;");
    let lost = m.power_loss();
    assert_eq!(
        lost,
        Discarded {
            bytes: 8,
            entries: 0
        }
    );
    assert_eq!(content(&m, "wal").unwrap(), b"entry-1;");
    assert_eq!(m.used(), 8);
}

#[test]
fn a_new_file_needs_its_own_sync_and_its_directory_sync() {
    // Data synced, name not: the file is gone.
    let mut m = Model::new(1 << 20);
    let a = m.create(ROOT, name("sst"), 0o644).unwrap();
    m.write(a.ino, 0, b"table").unwrap();
    m.sync(a.ino).unwrap();
    let lost = m.power_loss();
    assert_eq!(lost.entries, 1);
    assert_eq!(content(&m, "sst"), None);
    assert_eq!(m.inode_count(), 1, "only the root is left");

    // Name synced, data not: the file is there, empty.
    let a = m.create(ROOT, name("sst"), 0o644).unwrap();
    m.write(a.ino, 0, b"table").unwrap();
    m.sync(ROOT).unwrap();
    assert_eq!(
        m.power_loss(),
        Discarded {
            bytes: 5,
            entries: 0
        }
    );
    assert_eq!(content(&m, "sst").unwrap(), b"");
}

#[test]
fn a_rename_is_durable_only_once_its_directory_is_synced() {
    let mut m = Model::new(1 << 20);
    durable_file(&mut m, "CURRENT", b"MANIFEST-1");
    let tmp = m.create(ROOT, name("CURRENT.tmp"), 0o644).unwrap();
    m.write(tmp.ino, 0, b"MANIFEST-2").unwrap();
    m.sync(tmp.ino).unwrap();
    m.rename(ROOT, name("CURRENT.tmp"), ROOT, name("CURRENT"), false)
        .unwrap();
    assert_eq!(content(&m, "CURRENT").unwrap(), b"MANIFEST-2");
    m.power_loss();
    assert_eq!(content(&m, "CURRENT").unwrap(), b"MANIFEST-1");
    assert_eq!(content(&m, "CURRENT.tmp"), None);

    let tmp = m.create(ROOT, name("CURRENT.tmp"), 0o644).unwrap();
    m.write(tmp.ino, 0, b"MANIFEST-2").unwrap();
    m.sync(tmp.ino).unwrap();
    m.rename(ROOT, name("CURRENT.tmp"), ROOT, name("CURRENT"), false)
        .unwrap();
    m.sync(ROOT).unwrap();
    assert_eq!(m.power_loss(), Discarded::default());
    assert_eq!(content(&m, "CURRENT").unwrap(), b"MANIFEST-2");
    assert_eq!(m.inode_count(), 2, "the replaced file is dropped");
}

#[test]
fn an_unlink_not_synced_brings_the_file_back() {
    let mut m = Model::new(1 << 20);
    durable_file(&mut m, "old.log", b"kept");
    m.remove(ROOT, name("old.log"), false).unwrap();
    assert_eq!(content(&m, "old.log"), None);
    m.power_loss();
    assert_eq!(content(&m, "old.log").unwrap(), b"kept");
    m.remove(ROOT, name("old.log"), false).unwrap();
    m.sync(ROOT).unwrap();
    assert_eq!(m.inode_count(), 1);
    assert_eq!(m.used(), 0);
}

#[test]
fn an_open_file_outlives_its_name_until_it_is_released() {
    let mut m = Model::new(1 << 20);
    let ino = durable_file(&mut m, "f", b"abc");
    m.open(ino).unwrap();
    m.remove(ROOT, name("f"), false).unwrap();
    m.sync(ROOT).unwrap();
    assert_eq!(m.read(ino, 0, 3).unwrap(), b"abc");
    m.release(ino);
    assert!(m.read(ino, 0, 3).is_err());
}

#[test]
fn writes_across_pages_truncation_and_holes_read_back_exactly() {
    let mut m = Model::new(1 << 20);
    let a = m.create(ROOT, name("f"), 0o644).unwrap();
    let big: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i % 251) as u8).collect();
    m.write(a.ino, 10, &big).unwrap();
    m.sync(a.ino).unwrap();
    // Overwrite inside one page after the sync: the durable copy keeps the old page.
    m.write(a.ino, PAGE as u64 + 5, b"XYZ").unwrap();
    m.truncate(a.ino, 2 * PAGE as u64 + 7).unwrap();
    m.truncate(a.ino, 2 * PAGE as u64 + 20).unwrap();
    let now = m.read(a.ino, 0, 4 * PAGE).unwrap();
    assert_eq!(now.len(), 2 * PAGE + 20);
    assert_eq!(&now[..10], &[0u8; 10]);
    assert_eq!(&now[PAGE + 5..PAGE + 8], b"XYZ");
    assert_eq!(
        &now[2 * PAGE + 7..],
        &[0u8; 13],
        "a truncated tail reads zeros"
    );
    m.sync(ROOT).unwrap();
    m.power_loss();
    let back = m.read(a.ino, 0, 4 * PAGE).unwrap();
    let mut expect = vec![0u8; 10];
    expect.extend_from_slice(&big);
    assert_eq!(back, expect);
}

#[test]
fn a_full_disk_refuses_growth_but_not_overwrites() {
    let mut m = Model::new(100);
    let a = m.create(ROOT, name("f"), 0o644).unwrap();
    m.write(a.ino, 0, &[1; 90]).unwrap();
    assert_eq!(m.write(a.ino, 90, &[2; 20]), Err(FsError::NoSpace));
    m.write(a.ino, 0, &[3; 50]).unwrap();
    assert_eq!(m.truncate(a.ino, 200), Err(FsError::NoSpace));
    assert_eq!(m.allocate(a.ino, 200, false), Err(FsError::NoSpace));
    m.set_capacity(1000);
    m.allocate(a.ino, 200, false).unwrap();
    assert_eq!(m.used(), 200);
}

#[test]
fn hard_links_share_data_and_the_last_name_frees_it() {
    let mut m = Model::new(1 << 20);
    let ino = durable_file(&mut m, "000012.sst", b"rows");
    let d = m.mkdir(ROOT, name("checkpoint"), 0o755).unwrap();
    m.link(ino, d.ino, name("000012.sst")).unwrap();
    assert_eq!(m.attr(ino).unwrap().links, 2);
    m.remove(ROOT, name("000012.sst"), false).unwrap();
    assert_eq!(m.lookup(d.ino, name("000012.sst")).unwrap().ino, ino);
    assert_eq!(
        m.remove(ROOT, name("checkpoint"), true),
        Err(FsError::NotEmpty)
    );
    m.remove(d.ino, name("000012.sst"), false).unwrap();
    m.remove(ROOT, name("checkpoint"), true).unwrap();
    m.sync(ROOT).unwrap();
    assert_eq!(m.inode_count(), 1);
}

#[test]
fn a_directory_synced_without_its_parent_is_lost_with_everything_in_it() {
    let mut m = Model::new(1 << 20);
    let d = m.mkdir(ROOT, name("db"), 0o755).unwrap();
    let f = m.create(d.ino, name("LOG"), 0o644).unwrap();
    m.write(f.ino, 0, b"x").unwrap();
    m.sync(f.ino).unwrap();
    m.sync(d.ino).unwrap();
    m.power_loss();
    assert!(m.lookup(ROOT, name("db")).is_err());
    assert_eq!(m.inode_count(), 1);
}

#[test]
fn a_failed_sync_strands_its_pages_even_if_a_later_sync_succeeds() {
    let mut m = Model::new(1 << 20);
    let ino = durable_file(&mut m, "wal", b"one;");
    m.write(ino, 4, b"two;").unwrap();
    m.fail_sync(ino);
    // The retry "succeeds" and writes nothing: the page was marked clean.
    m.sync(ino).unwrap();
    assert_eq!(content(&m, "wal").unwrap(), b"one;two;");
    assert_eq!(m.unsynced().bytes, 4);
    assert_eq!(m.power_loss().bytes, 4);
    // The size was synced, the bytes were not: the tail reads zeros.
    assert_eq!(content(&m, "wal").unwrap(), b"one;\0\0\0\0");
}
