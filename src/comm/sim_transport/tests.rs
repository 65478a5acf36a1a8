//! The in-process transport: matching, categories, groups, deadlocks, mismatches.
use super::*;
use crate::backend::Dtype;
use crate::comm::Comm;

/// Runs `body` on `n` simulated ranks; returns each rank's messages.
fn on_ranks(n: usize, body: impl Fn(&ShapeBackend, &Comm<'_, ShapeBackend>, &Group) -> Result<()> + Sync) -> Vec<std::result::Result<Vec<MessageRecord>, String>> {
    let world = SimWorld::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (world, body) = (&world, &body);
                s.spawn(move || {
                    let be = ShapeBackend::new(Dtype::Bf16);
                    let (t, log) = SimTransport::new(world, r, be.recorder());
                    let comm = Comm::new(&be, Box::new(t));
                    let g = comm.world_group().map_err(|e| e.to_string())?;
                    let out = body(&be, &comm, &g).map_err(|e| e.to_string());
                    if let Err(e) = &out {
                        world.abort(e);
                    }
                    drop(comm);
                    out.map(|_| log.borrow().clone())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("no panic")).collect()
    })
}

#[test]
fn a_send_is_matched_to_its_receive_with_the_category_comm_announces() {
    let out = on_ranks(2, |be, comm, world| {
        if world.rank() == 0 {
            comm.send(Category::PpP2p, world, 1, &be.zeros(8)?)?;
        } else {
            comm.recv(Category::PpP2p, world, 0, 8)?;
        }
        Ok(())
    });
    let (a, b) = (out[0].clone().unwrap(), out[1].clone().unwrap());
    assert_eq!((a[0].category, a[0].bytes, b[0].bytes), (Some(Category::PpP2p), 16, 16));
    assert_eq!(a[0].sends[0].message, b[0].recvs[0].message);
    assert_eq!((a[0].sends[0].peer, b[0].recvs[0].peer), (1, 0));
}

#[test]
fn collectives_join_their_members_and_splits_make_groups() {
    let out = on_ranks(4, |be, comm, world| {
        let g = comm.split(world, Some((world.rank() % 2) as u32), "pair")?.expect("a member");
        assert_eq!(g.world_ranks, if world.rank() % 2 == 0 { vec![0, 2] } else { vec![1, 3] });
        let mut x = be.zeros(4)?;
        comm.all_reduce(Category::TpAllreduce, &g, &mut x)?;
        Ok(())
    });
    let ids: Vec<u64> = out.iter().map(|r| r.clone().unwrap()[0].collective.unwrap()).collect();
    assert_eq!(ids[0], ids[2]);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(out[0].clone().unwrap()[0].bytes, 8, "4 bf16 elements");
}

#[test]
fn a_receive_no_rank_sends_ends_every_rank_with_what_each_waited_for() {
    let out = on_ranks(2, |_be, comm, world| {
        comm.recv(Category::PpP2p, world, 1 - world.rank(), 4)?;
        Ok(())
    });
    let e = out[0].clone().unwrap_err();
    assert!(e.contains("no rank can make progress") && e.contains("a message from rank 1"), "{e}");
}

#[test]
fn mismatched_collectives_are_refused() {
    let out = on_ranks(2, |be, comm, world| {
        let mut x = be.zeros(4 + world.rank())?;
        comm.all_reduce(Category::TpAllreduce, world, &mut x)
    });
    // The last member to arrive finds the mismatch and ends the simulation.
    assert!(out.iter().any(|r| r.as_ref().is_err_and(|e| e.contains("collective mismatch"))), "{out:?}");
}

#[test]
fn a_receive_from_several_peers_takes_their_messages_in_the_order_it_lists_them() {
    let out = on_ranks(3, |be, comm, world| {
        let me = world.rank();
        if me < 2 {
            let parts = vec![crate::comm::SendTo { peer: 2, range: 0..4 }];
            let t = comm.issue(Category::PoolScatter, world, Some((be.zeros(4)?, parts)), None)?;
            comm.complete(t)?;
        } else {
            let parts = vec![RecvPart { peer: 1, range: 0..4 }, RecvPart { peer: 0, range: 4..8 }];
            let t = comm.issue(Category::PoolScatter, world, None, Some((be.zeros(8)?, parts)))?;
            comm.complete(t)?;
        }
        Ok(())
    });
    let logs: Vec<Vec<MessageRecord>> = out.into_iter().map(|r| r.unwrap()).collect();
    let got = &logs[2][0].recvs;
    assert_eq!(got.iter().map(|p| p.peer).collect::<Vec<_>>(), vec![1, 0]);
    assert_eq!((got[0].message, got[1].message), (logs[1][0].sends[0].message, logs[0][0].sends[0].message));
}

#[test]
fn a_rank_that_joins_no_group_of_a_split_does_not_wait_for_it() {
    // Rank 1 splits only after rank 0's message, which rank 0 sends after
    // its own part of the split: waiting there would never end.
    let out = on_ranks(2, |be, comm, world| {
        if world.rank() == 0 {
            assert!(comm.split(world, None, "one")?.is_none());
            comm.send(Category::PpP2p, world, 1, &be.zeros(4)?)?;
        } else {
            comm.recv(Category::PpP2p, world, 0, 4)?;
            assert_eq!(comm.split(world, Some(0), "one")?.expect("a member").world_ranks, vec![1]);
        }
        Ok(())
    });
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
}
