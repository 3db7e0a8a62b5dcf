package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"
)

// maxReply is the longest reply line the client reads.
const maxReply = 16 << 20

// Client is a connection to a control server. Its methods are safe for
// concurrent use (calls are serialised).
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	nextID int64
	broken error
}

// Dial connects to the control socket at path.
func Dial(path string) (*Client, error) {
	return DialContext(context.Background(), path)
}

// DialContext connects to the control socket at path, giving up when ctx
// ends (or after 10 seconds).
func DialContext(ctx context.Context, path string) (*Client, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	return &Client{conn: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Call runs command cmd with args (any value that encodes as a JSON
// object; nil for none) and decodes the reply's return value into result
// (nil to ignore it). An error reply is returned as *Error. When ctx ends
// during the call the connection is unusable afterwards.
func (c *Client) Call(ctx context.Context, cmd string, args, result any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return c.broken
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	c.nextID++
	id := strconv.FormatInt(c.nextID, 10)
	req := Request{Execute: cmd, ID: json.RawMessage(id)}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("control: encoding the arguments of %s: %w", cmd, err)
		}
		req.Arguments = b
	}
	line, err := json.Marshal(req)
	if err != nil {
		return err
	}
	// The end of ctx interrupts the I/O.
	c.conn.SetDeadline(time.Time{})
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired // the deadline is set: never under a later call
		}
	}()
	fail := func(err error) error {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		c.broken = fmt.Errorf("control: connection unusable after an earlier failure: %w", err)
		c.conn.Close()
		return err
	}
	if _, err := c.conn.Write(append(line, '\n')); err != nil {
		// The server may have said why it closed the connection.
		c.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if b, rerr := readLine(c.r, maxReply); rerr == nil {
			var resp Response
			if json.Unmarshal(b, &resp) == nil && resp.Error != nil {
				err = resp.Error
			}
		}
		return fail(err)
	}
	reply, err := readLine(c.r, maxReply)
	if err != nil {
		if errors.Is(err, errLineTooLong) {
			err = errors.New("control: reply line too long")
		}
		return fail(err)
	}
	var resp Response
	if err := json.Unmarshal(reply, &resp); err != nil {
		return fail(fmt.Errorf("control: invalid reply: %w", err))
	}
	if string(resp.ID) != id {
		if resp.Error != nil && resp.ID == nil {
			// The server answered without reading the request (too many
			// connections, overlong line).
			return fail(resp.Error)
		}
		return fail(fmt.Errorf("control: reply to request %s answers %s", id, resp.ID))
	}
	if resp.Error != nil {
		return resp.Error
	}
	if result != nil {
		if err := json.Unmarshal(resp.Return, result); err != nil {
			return fmt.Errorf("control: decoding the reply to %s: %w", cmd, err)
		}
	}
	return nil
}
