# Splits the samples of a profile by the task or thread they ran in (scripts/profile).
#
# Input: folded stacks from `inferno-collapse-perf`, one per line, frames joined by `;`,
# then the sample weight. A stack counts for the first task below whose future (or thread
# name) it contains, so a core actor's call into the outbox counts for the core actors.
# Output: one line per task, its share of all samples; scripts/profile sorts it.
# With `-v core=1`: the core actors' samples only, split by what core was doing, each as a
# share of all samples.
{
  n = $NF
  total += n
  if (core) {
    if ($0 !~ /runtime::core::run/) next
    if ($0 ~ /Core::append/) t = "core: append (stage a send's copies in its log)"
    else if ($0 ~ /Core::dispatch/) t = "core: dispatch (choose instance and lane, queue the frame)"
    else if ($0 ~ /Outbox<R>::on_ack/) t = "core: on_ack (entries acked)"
    else if ($0 ~ /Core::settle/) t = "core: settle (remove entries, answer receipts)"
    else if ($0 ~ /Core::completed|Core::queue_ack|Core::flush_acks/) t = "core: completions and acks out (receiver)"
    else if ($0 ~ /Core::on_durable/) t = "core: commit reports (copies made sendable)"
    else t = "core: other"
  } else if ($0 ~ /^peerbus-store/) t = "store writer thread (group commits, fsync)"
  else if ($0 ~ /runtime::core::run/) t = "core actors (logs, dispatch, acks; one per node)"
  else if ($0 ~ /conn::lane_reader/) t = "lane readers (decode, hand over)"
  else if ($0 ~ /conn::writer/) t = "connection writers (encode, flush)"
  else if ($0 ~ /conn::control_reader/) t = "control readers (acks in)"
  else if ($0 ~ /subscription::/) t = "subscriptions and message handlers"
  else if ($0 ~ /node::serve_fn/) t = "serve handlers"
  else if ($0 ~ /ConnectionDriver/) t = "quinn connection drivers"
  else if ($0 ~ /EndpointDriver|quinn::endpoint/) t = "quinn endpoint drivers"
  else if ($0 ~ /bench::raw/) t = "raw quinn baseline"
  else if ($0 ~ /bench::cases/) t = "bench callers (send, publish, request)"
  else if ($0 ~ /tokio::runtime::(scheduler|park|io|time)|std::thread::park/) t = "tokio scheduler, I/O and timers"
  else t = "other"
  by[t] += n
}
END {
  for (t in by) printf "%6.1f%%  %s\n", 100 * by[t] / total, t
}
