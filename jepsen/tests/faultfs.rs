//! The fault filesystem mounted for real (needs root and /dev/fuse; without them each
//! test says why and passes without running): what fsync makes durable survives a power
//! loss and nothing else does, a failed fsync strands its bytes, a full disk says ENOSPC.

use idem_jepsen::faultfs::{self, Discarded, FaultFs, Faults};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

fn mount(dir: &Path) -> Option<FaultFs> {
    if let Err(why) = faultfs::available() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(FaultFs::mount(&dir.join("mnt"), 64 << 20).expect("mount"))
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn only_what_fsync_made_durable_survives_a_power_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut fs) = mount(tmp.path()) else {
        return;
    };
    let root = fs.dir().to_path_buf();
    let db = root.join("db");
    fs::create_dir(&db).unwrap();
    sync_dir(&root);
    // A log with a synced head and an unsynced tail.
    let mut wal = File::create(db.join("000001.log")).unwrap();
    wal.write_all(b"synced entry;").unwrap();
    wal.sync_all().unwrap();
    sync_dir(&db);
    wal.write_all(b"unsynced entry;").unwrap();
    // A new file synced, its name not; a rename not synced.
    let mut sst = File::create(db.join("000002.sst")).unwrap();
    sst.write_all(b"table").unwrap();
    sst.sync_all().unwrap();
    fs::write(db.join("CURRENT.tmp"), b"MANIFEST-2").unwrap();
    fs::rename(db.join("CURRENT.tmp"), db.join("CURRENT")).unwrap();
    assert_eq!(
        fs::read(db.join("000001.log")).unwrap(),
        b"synced entry;unsynced entry;"
    );
    drop((wal, sst));

    let lost = fs.power_loss().unwrap();
    assert_eq!(
        lost.bytes,
        15 + 10,
        "the log's tail and CURRENT.tmp's bytes"
    );
    assert!(lost.entries >= 3, "{lost:?}");
    assert_eq!(fs::read(db.join("000001.log")).unwrap(), b"synced entry;");
    let mut names: Vec<String> = fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["000001.log"]);
    assert_eq!(fs.unsynced(), Discarded::default());
    // A lost disk: nothing is left.
    fs.wipe().unwrap();
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
    assert_eq!(fs.stats().used, 0);
}

#[test]
fn a_failed_fsync_is_eio_and_a_retry_does_not_save_the_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mut fs) = mount(tmp.path()) else {
        return;
    };
    let path = fs.dir().join("wal");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"one;").unwrap();
    f.sync_all().unwrap();
    sync_dir(fs.dir());
    f.write_all(b"two;").unwrap();
    fs.set_faults(Faults {
        fsync_eio: true,
        delay: None,
    });
    let err = f.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    fs.set_faults(Faults::default());
    f.sync_all().unwrap();
    assert_eq!(fs.stats().fsync_eio, 1);
    drop(f);
    assert_eq!(fs.power_loss().unwrap().bytes, 4);
    assert_eq!(fs::read(&path).unwrap(), b"one;\0\0\0\0");
}

#[test]
fn a_full_disk_refuses_growth_with_enospc() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = mount(tmp.path()) else {
        return;
    };
    let path = fs.dir().join("f");
    fs::write(&path, vec![7u8; 10_000]).unwrap();
    fs.fill(100);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    let err = f.write_all(&[1u8; 4096]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC: {err}");
    assert!(fs.stats().enospc >= 1);
    fs.set_capacity(64 << 20);
    f.write_all(&[1u8; 4096]).unwrap();
}
