"""Text of the files that run inside the guest (busybox ash scripts, configs).

Everything here is plain data; :mod:`kvmotion_lab.image.build` writes it into the
initramfs.  Changing any of these strings changes the recipe hash, so cached
images are rebuilt automatically.

Guest interface (see also ``GUEST_PROTOCOL`` below):

* kernel cmdline: ``kvmotion.ip=A.B.C.D/NN`` ``kvmotion.gw=A.B.C.D``
  ``kvmotion.dirty=R`` (MB/s, float, 0=off) ``kvmotion.dirty_region=M`` (MB,
  default 64) ``kvmotion.hostname=NAME`` (default ``kvmotion-guest``).  Without
  ``kvmotion.ip`` the guest tries DHCP (udhcpc) on the first NIC.
* record writer (off unless ``kvmotion.records`` is set; pass these through the
  free-form ``extra`` of :func:`kvmotion_lab.image.build.kernel_cmdline`):
  ``kvmotion.records=DEV`` (block device name under ``/dev``, e.g. ``vdb``;
  only ``[a-z0-9]``), ``kvmotion.records_rate=N`` (records per second, integer,
  default 20, 0 = as fast as possible), ``kvmotion.records_size=N`` (record size
  in KiB, default 4, a multiple of 4 in 4..1024; anything else falls back to 4
  with a ``KVMOTION-WARN`` line).  The writer appends records to the raw device:
  record ``seq`` (1, 2, 3, ...) lives at byte offset ``seq * size``; slot 0 is
  never written.  Layout of one record (see :mod:`kvmotion_lab.records`):
  a 128-byte header, ``KVREC 1 seq=N run=BOOT_ID size_kb=S md5=HEX``
  left-justified, space-padded to 127 bytes plus ``\\n``, then the payload
  (``size * 1024 - 128`` random bytes, one of up to 64 per-boot templates picked
  by ``seq % templates``); ``md5`` is the md5 of the payload.  Each record is
  written with ``dd conv=notrunc,fsync`` (plus ``oflag=direct`` when the device
  accepts O_DIRECT) and acknowledged on the console only after dd succeeded;
  a failed write is retried (same seq, never skipped).  The last acked seq is
  in ``/run/kvmotion/records_acked`` and in the heartbeat JSON
  (``records_acked``).
* serial console lines (``\\n`` terminated, ``onlcr`` is switched off)::

    KVMOTION-DISK dev=/dev/vda sectors=N size_mb=M      (only if /dev/vda exists)
    KVMOTION-DIRTIER rate=R region=M chunk=C            (only if R > 0)
    KVMOTION-RECORDS dev=/dev/vdb size_kb=S rate=R      (record writer starts)
    KVMOTION-RECORD-ACK seq=N run=BOOT_ID               (record N is durable)
    KVMOTION-RECORD-ERROR seq=N                         (write failed; retried)
    KVMOTION-RECORDS-FULL seq=N                         (N does not fit; writer stops)
    KVMOTION-IDENTITY uuid=UUID serial=S                (SMBIOS; none if absent)
    KVMOTION-READY ip=A.B.C.D                           (ip=none if no address)
    KVMOTION-HEARTBEAT seq=N uptime=F boot_id=UUID      (every 10 ticks of ~100 ms)

* HTTP on port 80: ``/cgi-bin/heartbeat`` (application/json, canonical),
  ``/heartbeat`` (same JSON served as a static file), ``/`` (text page).
  The heartbeat JSON (one object, rewritten atomically every tick)::

    {"seq": N, "uptime": F, "boot_id": "UUID", "hostname": "NAME",
     "dirty_mb_s": R, "dirtied_mb": N, "ip": "A.B.C.D", "records_acked": N,
     "smbios_uuid": "UUID", "smbios_serial": "S", "macs": ["52:54:00:..", ...]}

  ``seq`` counts ticks since boot; ``dirtied_mb`` (MB written by the dirtier)
  and ``records_acked`` never decrease within one boot.  The identity fields
  are read once at boot and never change: ``smbios_uuid`` and ``smbios_serial``
  are the SMBIOS type-1 system UUID and serial number
  (``/sys/class/dmi/id/product_uuid`` and ``product_serial``, lower case; ``""``
  when the firmware has none), ``macs`` the MAC address of every network
  interface except ``lo``, lower case, in interface-name order.
"""

from __future__ import annotations

HEARTBEAT_TICK_CS = 10
"""Heartbeat tick in centiseconds (the ``seq`` counter advances once per tick)."""

HEARTBEAT_PRINT_EVERY = 10
"""A ``KVMOTION-HEARTBEAT`` line is printed every this many ticks (~1 s)."""

INIT_SCRIPT = r"""#!/bin/sh
# kvmotion guest /init (PID 1).  Must never exit.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=0755,size=8m tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
dmesg -n 1 2>/dev/null
CON=/dev/console
[ -c /dev/ttyS0 ] && CON=/dev/ttyS0
exec </dev/null >"$CON" 2>&1
stty -F "$CON" -onlcr 2>/dev/null
mkdir -p /run/kvmotion
echo 0 > /run/kvmotion/dirtied_mb
echo 0 > /run/kvmotion/records_acked

now_cs() {  # NOW := uptime in centiseconds (no fork)
    read -r _u _i < /proc/uptime
    NOW=$(( ${_u%.*} * 100 + 1${_u#*.} - 100 ))
}

# ---- kernel command line -------------------------------------------------
KIP= ; KGW= ; KDIRTY=0 ; KREGION=64 ; KHOST=kvmotion-guest ; KMARKER=
KREC= ; KREC_RATE=20 ; KREC_KB=4
read -r CMDLINE < /proc/cmdline
set -f
for arg in $CMDLINE; do
    case "$arg" in
        kvmotion.ip=*) KIP=${arg#*=} ;;
        kvmotion.gw=*) KGW=${arg#*=} ;;
        kvmotion.dirty=*) KDIRTY=${arg#*=} ;;
        kvmotion.dirty_region=*) KREGION=${arg#*=} ;;
        kvmotion.hostname=*) KHOST=${arg#*=} ;;
        kvmotion.marker=*) KMARKER=${arg#*=} ;;
        kvmotion.records=*) KREC=${arg#*=} ;;
        kvmotion.records_rate=*) KREC_RATE=${arg#*=} ;;
        kvmotion.records_size=*) KREC_KB=${arg#*=} ;;
    esac
done
set +f
case "$KDIRTY" in ''|*[!0-9.eE+-]*) KDIRTY=0 ;; esac
KDIRTY=$(awk -v d="$KDIRTY" 'BEGIN { if (d + 0 < 0) d = 0; printf "%g", d + 0 }')
RATE_KB=$(awk -v d="$KDIRTY" 'BEGIN { printf "%d", d * 1024 }')
case "$KREGION" in ''|*[!0-9]*) KREGION=64 ;; esac
[ "$KREGION" -ge 1 ] || KREGION=1
case "$KHOST" in ''|*[!A-Za-z0-9.-]*) KHOST=kvmotion-guest ;; esac
hostname "$KHOST"
case "$KREC" in *[!a-z0-9]*) echo "KVMOTION-WARN records: bad device name; writer off"; KREC= ;; esac
case "$KREC_RATE" in ''|0?*|*[!0-9]*|??????????*) echo "KVMOTION-WARN records: bad rate; using 20"; KREC_RATE=20 ;; esac
case "$KREC_KB" in
    ''|0*|*[!0-9]*|?????*) KREC_KB=0 ;;
esac
if [ "$KREC_KB" -lt 4 ] || [ "$KREC_KB" -gt 1024 ] || [ $((KREC_KB % 4)) -ne 0 ]; then
    echo "KVMOTION-WARN records: bad record size; using 4 KiB"
    KREC_KB=4
fi
read -r BOOT_ID < /proc/sys/kernel/random/boot_id

# ---- modules -------------------------------------------------------------
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" || echo "KVMOTION-WARN insmod $m failed"
done < /etc/kvmotion/modules

if [ -b /dev/vda ]; then
    read -r SECT < /sys/block/vda/size
    echo "KVMOTION-DISK dev=/dev/vda sectors=$SECT size_mb=$((SECT / 2048))"
fi

# ---- network -------------------------------------------------------------
ip link set lo up
IFACE=
i=0
while [ $i -lt 50 ]; do
    for n in /sys/class/net/*; do
        n=${n##*/}
        [ "$n" = lo ] && continue
        IFACE=$n
        break
    done
    [ -n "$IFACE" ] && break
    usleep 100000
    i=$((i + 1))
done
ADDR=none
if [ -n "$IFACE" ]; then
    ip link set "$IFACE" up
    if [ -n "$KIP" ]; then
        case "$KIP" in */*) ;; *) KIP="$KIP/24" ;; esac
        ip addr add "$KIP" dev "$IFACE" && ADDR=${KIP%/*}
        [ -n "$KGW" ] && ip route add default via "$KGW" dev "$IFACE"
    else
        udhcpc -i "$IFACE" -n -q -t 4 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1
        [ -s /run/kvmotion/dhcp_ip ] && read -r ADDR < /run/kvmotion/dhcp_ip
    fi
    [ "$ADDR" != none ] && arping -U -c 1 -I "$IFACE" "$ADDR" >/dev/null 2>&1 &
else
    echo "KVMOTION-WARN no network interface found"
fi

# ---- identity (read once: SMBIOS system UUID + serial, NIC MACs) -----------
dmi_field() {  # $1 = /sys/class/dmi/id file; lower case, only [a-z0-9._:-] (safe inside JSON)
    _v=
    [ -r "$1" ] && read -r _v < "$1" 2>/dev/null
    case "$_v" in *[!a-z0-9.:_-]*) _v=$(printf '%s' "$_v" | tr 'A-Z' 'a-z' | tr -cd 'a-z0-9._:-') ;; esac
    printf '%s' "$_v"
}
SMUUID=$(dmi_field /sys/class/dmi/id/product_uuid)
SMSERIAL=$(dmi_field /sys/class/dmi/id/product_serial)
MACS=
for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] && continue
    [ -r "$n/address" ] || continue
    read -r _m < "$n/address"
    case "$_m" in ''|*[!0-9a-fA-F:]*) continue ;; esac
    MACS="$MACS${MACS:+, }\"$_m\""
done
echo "KVMOTION-IDENTITY uuid=${SMUUID:-none} serial=${SMSERIAL:-none}"

# ---- heartbeat state + http ----------------------------------------------
SEQ=0
DMB=0
RACK=0
write_state() {
    read -r _d < /run/kvmotion/dirtied_mb 2>/dev/null
    case "$_d" in ''|*[!0-9]*) ;; *) DMB=$_d ;; esac   # unreadable or empty: keep the last
    read -r _r < /run/kvmotion/records_acked 2>/dev/null
    case "$_r" in ''|*[!0-9]*) ;; *) RACK=$_r ;; esac   # empty while being rewritten: keep the last
    {
        printf '{"seq": %d, "uptime": %s, "boot_id": "%s", ' "$SEQ" "$_u" "$BOOT_ID"
        printf '"hostname": "%s", "dirty_mb_s": %s, "dirtied_mb": %d, "ip": "%s", "records_acked": %d, ' \
            "$KHOST" "$KDIRTY" "$DMB" "$ADDR" "$RACK"
        printf '"smbios_uuid": "%s", "smbios_serial": "%s", "macs": [%s]}\n' "$SMUUID" "$SMSERIAL" "$MACS"
    } > /www/.heartbeat.tmp
    mv -f /www/.heartbeat.tmp /www/heartbeat
}
now_cs
write_state
ln -sf /www/heartbeat /run/kvmotion/heartbeat.json
cat > /www/index.html <<EOF
kvmotion guest $KHOST
boot_id $BOOT_ID
ip $ADDR
dirty_mb_s $KDIRTY
endpoints: /cgi-bin/heartbeat (JSON), /heartbeat (same JSON, static file)
EOF
start_httpd() {
    httpd -f -p 80 -h /www -c /etc/httpd.conf &
    HTTPD_PID=$!
}
start_httpd

# ---- memory dirtier ------------------------------------------------------
dirtier() {  # $1=rate KB/s $2=region MB $3=chunk MB
    rate=$1; region=$2; chunk=$3
    src=/dev/shm/kvmotion-src; dst=/dev/shm/kvmotion-dirty
    dd if=/dev/urandom of=$src bs=1048576 count=$((chunk + 2)) 2>/dev/null
    : > $dst
    off=0; n=0; wkb=0
    now_cs; start=$NOW
    while :; do
        now_cs
        due=$(( start + (wkb + chunk * 1024) * 100 / rate ))
        if [ "$NOW" -lt "$due" ]; then
            usleep $(( (due - NOW) * 10000 ))
            continue
        fi
        # more than 2 s behind (guest paused/too slow): do not burst to catch up
        [ $((NOW - due)) -gt 200 ] && start=$(( NOW - wkb * 100 / rate ))
        c=$chunk
        [ $((off + c)) -gt "$region" ] && c=$((region - off))
        dd if=$src of=$dst bs=1048576 skip=$((n % 3)) seek=$off count=$c conv=notrunc 2>/dev/null
        wkb=$((wkb + c * 1024)); n=$((n + 1)); off=$(( (off + c) % region ))
        # atomic (rename): a reader never sees the file truncated and still empty
        echo $((wkb / 1024)) > /run/kvmotion/dirtied_mb.tmp
        mv -f /run/kvmotion/dirtied_mb.tmp /run/kvmotion/dirtied_mb
    done
}
if [ "$RATE_KB" -gt 0 ]; then
    CHUNK=$(( (RATE_KB + 10 * 1024 - 1) / (10 * 1024) ))   # <= ~10 dd runs per second
    SHM_MB=$(df -m /dev/shm | awk 'NR == 2 { print $4 }')
    case "$SHM_MB" in ''|*[!0-9]*) SHM_MB=64 ;; esac
    MAXREG=$((SHM_MB - CHUNK - 4))
    [ "$MAXREG" -ge 1 ] || MAXREG=1
    [ "$KREGION" -gt "$MAXREG" ] && KREGION=$MAXREG
    [ "$CHUNK" -gt "$KREGION" ] && CHUNK=$KREGION
    echo "KVMOTION-DIRTIER rate=$KDIRTY region=$KREGION chunk=$CHUNK"
    dirtier "$RATE_KB" "$KREGION" "$CHUNK" &
    echo $! > /run/kvmotion/dirtier.pid
fi

# ---- record writer: sequence-numbered, checksummed records on a raw disk ------------
records_writer() {  # $1=device name $2=record KiB $3=records/s (0 = unpaced)
    dev=/dev/$1; rkb=$2; rate=$3
    rb=$((rkb * 1024)); plen=$((rb - 128))
    read -r sect < "/sys/block/$1/size"
    case "$sect" in ''|*[!0-9]*) sect=0 ;; esac
    max=$((sect * 512 / rb - 1))  # highest seq that fits (slot 0 stays unused)
    # Precompute (forks are slow under TCG): k templates = 128-byte header slot +
    # random payload, and their md5s.  Per record only the header is rewritten
    # in place (no fork) and one dd writes the record.
    d=/dev/shm/kvmotion-rec
    mkdir -p $d
    k=$((4096 / rkb)); [ $k -gt 64 ] && k=64; [ $k -lt 4 ] && k=4  # <= 4 MiB of templates
    ok=1; i=0
    while [ $i -lt $k ]; do
        dd if=/dev/urandom of=$d/p$i bs=$plen count=1 iflag=fullblock 2>/dev/null || ok=
        i=$((i + 1))
    done
    if [ -n "$ok" ] && md5sum $d/p* > $d/sums; then
        while read -r h f; do
            eval "M${f##*/p}=$h"
        done < $d/sums
    else
        ok=
    fi
    i=0
    while [ -n "$ok" ] && [ $i -lt $k ]; do
        { printf '%127s\n' ''; cat $d/p$i; } > $d/r$i || ok=
        : > $d/p$i  # free it now (no fork); removed below
        i=$((i + 1))
    done
    rm -f $d/p* $d/sums
    if [ -z "$ok" ]; then
        rm -rf $d
        echo "KVMOTION-WARN records: cannot prepare record templates in /dev/shm; writer off"
        return 1
    fi
    dflag=oflag=direct  # O_DIRECT if the device takes it (probed with a read)
    dd if="$dev" of=/dev/null bs=$rb count=1 iflag=direct 2>/dev/null || {
        dflag=
        echo "KVMOTION-WARN records: O_DIRECT not usable on $dev; writing with fsync only"
    }
    seq=1; n=0
    now_cs; start=$NOW
    while :; do
        if [ "$seq" -gt "$max" ]; then
            echo "KVMOTION-RECORDS-FULL seq=$seq"
            return 0
        fi
        if [ "$rate" -gt 0 ]; then
            now_cs
            due=$((start + n * 100 / rate))
            if [ "$NOW" -lt "$due" ]; then
                usleep $(((due - NOW) * 10000))
                continue
            fi
            # more than 2 s behind (guest paused/too slow): do not burst to catch up
            [ $((NOW - due)) -gt 200 ] && start=$((NOW - n * 100 / rate))
        fi
        i=$((seq % k))
        eval "h=\$M$i"
        printf '%-127s\n' "KVREC 1 seq=$seq run=$BOOT_ID size_kb=$rkb md5=$h" 1<> $d/r$i
        if dd if=$d/r$i of="$dev" bs=$rb count=1 seek=$seq conv=notrunc,fsync $dflag 2>/dev/null; then
            echo "KVMOTION-RECORD-ACK seq=$seq run=$BOOT_ID"
            echo $seq > /run/kvmotion/records_acked
            seq=$((seq + 1)); n=$((n + 1))
        else
            echo "KVMOTION-RECORD-ERROR seq=$seq"
            usleep 500000
        fi
    done
}
if [ -n "$KREC" ]; then
    i=0
    while [ ! -b "/dev/$KREC" ] && [ $i -lt 50 ]; do
        usleep 100000
        i=$((i + 1))
    done
    if [ -b "/dev/$KREC" ] && [ -r "/sys/block/$KREC/size" ]; then
        echo "KVMOTION-RECORDS dev=/dev/$KREC size_kb=$KREC_KB rate=$KREC_RATE"
        records_writer "$KREC" "$KREC_KB" "$KREC_RATE" &
        echo $! > /run/kvmotion/records.pid
    else
        echo "KVMOTION-WARN records: /dev/$KREC is not a whole block device; writer off"
    fi
fi

# ---- marker: a known string kept in guest RAM (to prove what crosses the wire) -----
case "$KMARKER" in *[!A-Za-z0-9._-]*) KMARKER= ;; esac
if [ -n "$KMARKER" ]; then
    ( while :; do
        i=0; : > /dev/shm/kvmotion-marker
        while [ $i -lt 256 ]; do echo "$KMARKER$KMARKER$KMARKER$KMARKER" >> /dev/shm/kvmotion-marker; i=$((i + 1)); done
        sleep 1
      done ) &
    echo "KVMOTION-MARKER len=${#KMARKER}"
fi

# ---- ready ---------------------------------------------------------------
i=0
while [ $i -lt 100 ]; do
    wget -q -O /dev/null http://127.0.0.1/cgi-bin/heartbeat 2>/dev/null && break
    usleep 50000
    i=$((i + 1))
done
echo "KVMOTION-READY ip=$ADDR"

# ---- heartbeat loop (PID 1 stays here; ash reaps orphans while waiting) ---
now_cs
NEXT=$NOW
while :; do
    SEQ=$((SEQ + 1))
    now_cs
    write_state
    if [ $((SEQ % @PRINT_EVERY@)) -eq 0 ]; then
        echo "KVMOTION-HEARTBEAT seq=$SEQ uptime=$_u boot_id=$BOOT_ID"
        kill -0 "$HTTPD_PID" 2>/dev/null || start_httpd
    fi
    NEXT=$((NEXT + @TICK_CS@))
    now_cs
    if [ "$NOW" -lt "$NEXT" ]; then
        usleep $(( (NEXT - NOW) * 10000 ))
    elif [ $((NOW - NEXT)) -gt 100 ]; then
        NEXT=$NOW
    fi
done
while :; do sleep 3600; done
""".replace("@PRINT_EVERY@", str(HEARTBEAT_PRINT_EVERY)).replace("@TICK_CS@", str(HEARTBEAT_TICK_CS))

CGI_HEARTBEAT = r"""#!/bin/sh
printf 'Content-Type: application/json\r\nCache-Control: no-store\r\n\r\n'
cat /www/heartbeat
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            set -- $router
            ip route add default via "$1" dev "$interface"
        fi
        echo "$ip" > /run/kvmotion/dhcp_ip
        ;;
esac
exit 0
"""

HTTPD_CONF = """A:*
.json:application/json
"""

ETC_FILES: dict[str, str] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/httpd.conf": HTTPD_CONF,
}
"""Plain (non-executable) files placed in the initramfs."""

EXEC_FILES: dict[str, str] = {
    "init": INIT_SCRIPT,
    "www/cgi-bin/heartbeat": CGI_HEARTBEAT,
    "etc/udhcpc.script": UDHCPC_SCRIPT,
}
"""Executable files placed in the initramfs."""
