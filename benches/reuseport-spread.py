#!/usr/bin/env python3
# How evenly does the kernel's SO_REUSEPORT hash spread loopback clients over N listeners?
import socket, sys, statistics
def trial(n_listeners, n_clients, port):
    ls=[]
    for _ in range(n_listeners):
        s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port)); s.listen(4096); s.setblocking(False); ls.append(s)
    cs=[]
    for _ in range(n_clients):
        c=socket.socket(); c.connect(("127.0.0.1", port)); cs.append(c)
    counts=[]
    for s in ls:
        k=0
        while True:
            try:
                a,_=s.accept(); a.close(); k+=1
            except BlockingIOError:
                break
        counts.append(k)
    for c in cs: c.close()
    for s in ls: s.close()
    return counts
for n,clients in [(2,100),(2,300),(4,100),(4,300)]:
    ratios=[]
    for t in range(20):
        c=trial(n,clients,20000+t+n*100+clients)
        ratios.append(min(c)/max(c))
    print(f"listeners={n} clients={clients}: min/max per trial median={statistics.median(ratios):.2f} worst={min(ratios):.2f}")
