//! Real cgroups (root, cgroup v2): create a child, move a process in, read its id, remove it.
//! Skips with a reason elsewhere; under CI (`CI=true`) a skip is a failure.
#![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::process::{Command, Stdio};

use depfence::cgroup::{Cgroup2, ChildCgroup, cgroup_id};

fn privileged(test: &str) -> Option<Cgroup2> {
    depfence_integration::require_privileges(test).then(|| Cgroup2::discover().unwrap())
}

#[test]
fn child_cgroup_holds_a_process_and_is_removed() {
    let Some(cg) = privileged("child_cgroup_holds_a_process_and_is_removed") else { return };
    let name = depfence_integration::unique_name("depfence-test");
    let child = ChildCgroup::create(cg.mount(), &name).unwrap();
    assert_eq!(child.id(), cgroup_id(child.dir()).unwrap());

    let mut sleeper = Command::new("sleep").arg("30").stdin(Stdio::null()).spawn().unwrap();
    let pid = sleeper.id();
    child.add_process(pid).unwrap();
    assert_eq!(child.processes().unwrap(), vec![pid]);
    let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(seen.contains(&format!("0::/{name}")), "{seen}");

    let dir = child.dir().to_owned();
    // Removal moves the process back to the parent and deletes the directory.
    child.remove().unwrap();
    assert!(!dir.exists());
    let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(!seen.contains(&name), "{seen}");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn refuses_names_that_leave_the_parent() {
    let Some(cg) = privileged("refuses_names_that_leave_the_parent") else { return };
    assert!(ChildCgroup::create(cg.mount(), "../x").is_err());
    assert!(ChildCgroup::create(cg.mount(), "").is_err());
}
