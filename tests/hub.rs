//! The `hub` feature without a network: offline, or with an unreachable
//! endpoint, fetching a model is a typed error naming the id and the
//! local-folder alternative; offline with the files in the cache it returns
//! the cached folder. No test contacts a real host (the one endpoint used is
//! a closed port on the loopback address).
#![cfg(feature = "hub")]

use ksa::hub::{fetch_model, HubOptions};
use ksa::Error;
use std::path::PathBuf;

const ID: &str = "OpenOneRec/KSA-4B-base";

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ksa-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_hub_error(err: Error, needle: &str) {
    let text = err.to_string();
    match err {
        Error::Hub { model_id, reason } => {
            assert_eq!(model_id, ID);
            assert!(reason.contains(needle), "{reason}");
        }
        other => panic!("expected Error::Hub, got {other}"),
    }
    assert!(text.contains(ID) && text.contains("--model DIR"), "{text}");
}

#[test]
fn offline_without_a_cached_copy_is_a_typed_error() {
    let cache = temp("offline");
    let options = HubOptions {
        offline: true,
        cache_dir: Some(cache.clone()),
        ..HubOptions::default()
    };
    assert_hub_error(fetch_model(ID, &options).unwrap_err(), "offline");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn unreachable_hub_is_a_typed_error() {
    let cache = temp("unreachable");
    let options = HubOptions {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused.
        endpoint: Some("http://127.0.0.1:9".into()),
        cache_dir: Some(cache.clone()),
        ..HubOptions::default()
    };
    assert_hub_error(fetch_model(ID, &options).unwrap_err(), "config.json");
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn offline_with_a_cached_copy_returns_its_folder() {
    let cache = temp("cached");
    // The Hugging Face cache layout: refs/main names the snapshot.
    let repo = cache.join("models--OpenOneRec--KSA-4B-base");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    let options = HubOptions {
        offline: true,
        cache_dir: Some(cache.clone()),
        ..HubOptions::default()
    };
    for file in ["config.json", "tokenizer.json"] {
        std::fs::write(snapshot.join(file), "{}").unwrap();
    }
    // Weights still missing: an error naming them.
    assert_hub_error(fetch_model(ID, &options).unwrap_err(), "model.safetensors");
    std::fs::write(snapshot.join("model.safetensors"), b"").unwrap();
    assert_eq!(fetch_model(ID, &options).unwrap(), snapshot);
    let _ = std::fs::remove_dir_all(cache);
}

#[test]
fn options_come_from_the_environment() {
    // The only test of this binary that reads the environment.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_HOME", "/nonexistent-hf-home");
    std::env::remove_var("HF_HUB_CACHE");
    let options = HubOptions::from_env();
    assert!(options.offline);
    assert_eq!(
        options.cache_dir,
        Some(PathBuf::from("/nonexistent-hf-home/hub"))
    );
    assert_hub_error(fetch_model(ID, &options).unwrap_err(), "offline");
}
